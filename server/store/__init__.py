"""The state store: what every replica of one deployment must agree on, behind one interface.

- task records: each task name's current spec (or a tombstone, or a damaged record) with a
  store-wide, monotonically increasing revision; writes are compare-and-set on that revision;
- blobs: content-addressed files (anchor caches, learned β) that every replica can load instead of
  rebuilding; caches are derivable, so a missing blob is a rebuild, never an error. The engine
  reaches a store only through this part (`anchor_cache.blobs.BlobStore`);
- job records and their PNG plots, with a time to live, so any replica answers for any job, and
  cancel requests that reach the replica running the job;
- change notification: a counter that grows with every task write or cancel request, and a
  blocking wait on it (Redis pub/sub, or polling a file on one host).

Backends: `LocalStore` (a state dir on one host, safe for several processes through a lock file)
and `RedisStore` (`redis://…`, for replicas on one or many machines). `open_store` picks one.
"""

from __future__ import annotations

from pathlib import Path

from server.store.base import StateStore
from server.store.records import ABSENT, TaskRecord

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")

__all__ = ["ABSENT", "REDIS_SCHEMES", "StateStore", "TaskRecord", "open_store"]


def open_store(url: str | None, state_dir: Path) -> StateStore:
    """`redis://…`, `rediss://…` or `unix://…`: a RedisStore; None or "" or "local": the LocalStore
    on `state_dir`. Each backend is imported only when chosen (redis-py is not needed otherwise)."""
    if url and url.startswith(REDIS_SCHEMES):
        from server.store.redis import RedisStore

        return RedisStore(url)
    if url not in (None, "", "local"):
        raise ValueError(f"state URL must be 'local' or redis://host:port[/db], got {url!r}")
    from server.store.local import LocalStore

    return LocalStore(state_dir)
