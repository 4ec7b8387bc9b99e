"""The state store a state URL names. Each backend is imported only when chosen (redis-py is not
needed otherwise), and from here rather than from the package, which the backends import."""

from __future__ import annotations

from pathlib import Path

from server.store.base import StateStore

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def open_store(url: str | None, state_dir: Path) -> StateStore:
    """`redis://…`, `rediss://…` or `unix://…`: a RedisStore; None or "" or "local": the LocalStore
    on `state_dir`."""
    if url and url.startswith(REDIS_SCHEMES):
        from server.store.redis import RedisStore

        return RedisStore(url)
    if url not in (None, "", "local"):
        raise ValueError(f"state URL must be 'local' or redis://host:port[/db], got {url!r}")
    from server.store.local import LocalStore

    return LocalStore(state_dir)
