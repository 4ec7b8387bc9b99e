"""The StateStore interface, and the record loop every backend shares (see the package docstring)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any

from server.store.records import Source, TaskRecord, is_task_name, parse_record


class StateStore(ABC):
    """Thread-safe; every method may block on I/O. Methods of a store that cannot be reached raise
    `anchor_cache.errors.UnavailableError` with a message naming the store (never a password)."""

    url: str  # for logs and messages, without credentials

    # --- task records ---------------------------------------------------------------------------

    def records(self) -> dict[str, TaskRecord]:
        """Every task name's record, tombstones and damaged records (repaired first) included."""
        found = {}
        for name, raw in sorted(self._stored_records().items()):
            record = self._checked(name, raw)
            if record is not None:
                found[name] = record
        return found

    def record(self, name: str) -> TaskRecord | None:
        """The name's record, or None if the name was never written (or is no valid task name)."""
        if not is_task_name(name):
            return None
        raw = self._stored_record(name)
        return None if raw is None else self._checked(name, raw)

    def _checked(self, name: str, raw: bytes) -> TaskRecord | None:
        record = parse_record(name, raw)
        return record if isinstance(record, TaskRecord) else self._repair(name, raw, record)

    @abstractmethod
    def _stored_records(self) -> dict[str, bytes]:
        """Every valid task name's stored record, as stored."""

    @abstractmethod
    def _stored_record(self, name: str) -> bytes | None:
        """The (valid) name's stored record, as stored; None if there is none."""

    @abstractmethod
    def _repair(self, name: str, raw: bytes, reason: str) -> TaskRecord | None:
        """Move the damaged record `raw` aside and store, at a new revision, a record whose error
        says so, unless another writer changed it meanwhile; returns the name's record then."""

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

    def wait_for_change(self, seen: int, timeout: float) -> int:
        """Block until `changes()` differs from `seen` or `timeout` seconds pass; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            current = self.changes()
            remaining = deadline - time.monotonic()
            if current != seen or remaining <= 0:
                return current
            self._await_change(seen, remaining)

    @abstractmethod
    def _await_change(self, seen: int, timeout: float) -> None:
        """Block for a while, up to `timeout`, returning early if a change may have come."""

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
