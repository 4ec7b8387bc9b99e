"""The StateStore interface and the record it keeps per task name (see the package docstring)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

ABSENT = -1  # `expect` for a create: the name must have no live record
Source = Literal["config", "admin"]


@dataclass(frozen=True)
class TaskRecord:
    """One task name's current state in the store.

    spec: the TaskSpec as JSON (`TaskSpec.model_dump(mode="json")`); None for a tombstone (deleted)
        or a damaged record.
    error: why the stored record could not be read (one line, relative paths only); the task is
        then reported failed on every replica until it is deleted or replaced.
    source: "config" for a record seeded from a replica's configuration, "admin" for an admin write.
    """

    name: str
    revision: int
    spec: dict[str, Any] | None
    source: Source = "admin"
    error: str | None = None

    @property
    def live(self) -> bool:
        """A name a create must not take: a spec, or a damaged record (delete or replace it)."""
        return self.spec is not None or self.error is not None


class StateStore(ABC):
    """Thread-safe; every method may block on I/O. Methods of a store that cannot be reached raise
    `anchor_cache.errors.UnavailableError` with a message naming the store (never a password)."""

    url: str  # for logs and messages, without credentials

    # --- task records ---------------------------------------------------------------------------

    @abstractmethod
    def records(self) -> dict[str, TaskRecord]:
        """Every task name's record, tombstones and damaged records included."""

    @abstractmethod
    def record(self, name: str) -> TaskRecord | None:
        """The name's record, or None if the name was never written (or is no valid task name)."""

    @abstractmethod
    def write(self, name: str, spec: dict[str, Any] | None, source: Source, expect: int | None) -> TaskRecord:
        """Atomically store a new revision of `name` (spec None: a tombstone) and notify.

        expect None: unconditional. ABSENT: only if the name has no live record, else ConflictError.
        n >= 0: only if the current revision is n (0: never written), else PreconditionFailedError.
        The new revision is larger than every revision the store ever gave out.
        A name, spec (a JSON object whose "name" is `name`), source or expect that is not valid
        raises ValidationError before anything is stored."""

    @abstractmethod
    def changes(self) -> int:
        """A counter that grows with every write and every cancel request (cheap to read)."""

    @abstractmethod
    def wait_for_change(self, seen: int, timeout: float) -> int:
        """Block until `changes()` differs from `seen` or `timeout` seconds pass; returns it."""

    # --- content-addressed blobs ----------------------------------------------------------------

    @abstractmethod
    def get_blob(self, name: str) -> bytes | None:
        """The blob's bytes (marking it used now, for garbage collection), or None."""

    @abstractmethod
    def put_blob(self, name: str, data: bytes) -> None:
        """Store atomically: a reader sees the old bytes or the new, never a mix."""

    @abstractmethod
    def quarantine_blob(self, name: str) -> str:
        """Move a damaged blob aside (kept, never served); returns where it went, for messages
        ("nowhere (…already gone)" if another replica moved or deleted it first)."""

    @abstractmethod
    def blob_ages(self) -> dict[str, float]:
        """Every blob name -> seconds since it was last written or read."""

    @abstractmethod
    def delete_blob(self, name: str) -> int:
        """Remove a blob; returns the bytes freed (0 if it was gone)."""

    # --- jobs -----------------------------------------------------------------------------------

    @abstractmethod
    def put_job(self, job_id: str, record: dict[str, Any], ttl_s: float) -> None:
        """Store (or overwrite) a job's JSON record, expiring `ttl_s` after this write."""

    @abstractmethod
    def get_job(self, job_id: str) -> dict[str, Any] | None: ...

    @abstractmethod
    def put_plot(self, job_id: str, name: str, png: bytes, ttl_s: float) -> None: ...

    @abstractmethod
    def get_plot(self, job_id: str, name: str) -> bytes | None: ...

    @abstractmethod
    def request_cancel(self, job_id: str) -> None:
        """Ask whichever replica runs `job_id` to cancel it (and notify)."""

    @abstractmethod
    def cancel_requested(self, job_ids: list[str]) -> set[str]:
        """Those of `job_ids` with a cancel request."""

    @abstractmethod
    def close(self) -> None:
        """Release connections and threads."""


def open_store(url: str | None, state_dir: Path) -> StateStore:
    """`redis://…` or `rediss://…`: a RedisStore; None or "" or "local": the LocalStore on `state_dir`."""
    if url and url.startswith(("redis://", "rediss://", "unix://")):
        from anchor_cache.state.redis import RedisStore

        return RedisStore(url)
    if url not in (None, "", "local"):
        raise ValueError(f"state URL must be 'local' or redis://host:port[/db], got {url!r}")
    from anchor_cache.state.local import LocalStore

    return LocalStore(state_dir)
