"""The state store on one host: files in a state dir, shared safely by several processes.

Layout (messages name files relative to the state dir, never by absolute path):
  .lock                          flock'ed (exclusive) around every read-check-write of the records
                                 and the revision counter
  revision                       the counter (a text integer): the last revision given out, also
                                 bumped by cancel requests; `changes()` reads it
  tasks/<name>.json              {"revision": n, "source": "config"|"admin", "spec": {...}|null}
                                 (+ "error": "..." for a record that replaced a damaged file)
  caches/<blob>                  blobs (`<key>.safetensors`, `<key>.beta.safetensors`); mtime = last use
  jobs/<id>.json                 {"expires": <unix time>, "record": {...}}
  jobs/<id>.<plot>.png           a job's plot
  jobs/<id>.cancel               a cancel request (kept one day)
  quarantine/<file>.<UTC time>   damaged files, moved here and never deleted

Every file under jobs/ has its mtime set to the time it expires, so a sweep (at each `put_job`)
deletes expired ones from a `stat` alone; readers treat an expired file as missing.

Files of earlier versions still read: a bare spec object in tasks/<name>.json is revision 0 from an
admin write, `{"deleted": true}` a tombstone at revision 0. The old `tasks/pending/` folder is
ignored (one warning at start if it holds files). A record file that cannot be parsed is moved to
quarantine/ and replaced, under the lock, by a record at a new revision whose `error` says so.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anchor_cache.errors import ConflictError, PreconditionFailedError, UnavailableError, ValidationError
from anchor_cache.state.base import ABSENT, Source, StateStore, TaskRecord
from anchor_cache.storage import fsync_directory, quarantine, remove_durably, write_atomic

log = logging.getLogger(__name__)

TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # job ids and plot names
BLOB_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}")  # no '/', no leading '.'
SOURCES = ("config", "admin")
CANCEL_TTL_S = 86400.0
POLL_S = 0.1
STALE_TEMP_S = 3600.0  # a write_atomic temporary this old in jobs/ was left by a crash


# --- validation and record decoding, shared with the Redis store ---------------------------------


def one_line(reason: object) -> str:
    """An exception or message on one line."""
    if isinstance(reason, BaseException):
        text = " ".join(str(reason).split())
        return f"{type(reason).__name__}: {text}" if text else type(reason).__name__
    return " ".join(str(reason).split())


def check_task_name(name: str) -> str:
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        raise ValidationError(f"task name {name!r} must match {TASK_NAME.pattern}")
    return name


def check_job_id(job_id: str, what: str = "job id") -> str:
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
        raise ValidationError(f"{what} {job_id!r} must match {JOB_ID.pattern}")
    return job_id


def check_blob_name(name: str) -> str:
    if not isinstance(name, str) or not BLOB_NAME.fullmatch(name):
        raise ValidationError(f"blob name {name!r} must match {BLOB_NAME.pattern} (no '/', no leading '.')")
    return name


def check_write(name: str, spec: dict[str, Any] | None, source: str, expect: int | None) -> None:
    """The arguments of `StateStore.write`, checked before anything is stored."""
    check_task_name(name)
    if spec is not None and not isinstance(spec, dict):
        raise ValidationError(f"task {name!r}: a spec must be a JSON object or None, got {type(spec).__name__}")
    if spec is not None and spec.get("name") != name:
        raise ValidationError(f"task {name!r}: its spec names task {spec.get('name')!r}")
    if source not in SOURCES:
        raise ValidationError(f"task {name!r}: source must be one of {SOURCES}, got {source!r}")
    if expect is not None and (type(expect) is not int or expect < ABSENT):
        raise ValidationError(f"task {name!r}: expect must be None, ABSENT ({ABSENT}) or a revision >= 0")


def decode_record(name: str, data: object, legacy: bool = False) -> TaskRecord:
    """A stored record as a TaskRecord; ValueError (a one-line reason) if it is not a valid one.
    With `legacy`, the formats of earlier versions are accepted too (see the module docstring)."""
    if not isinstance(data, dict):
        raise ValueError(f"not a JSON object but {type(data).__name__}")
    if "revision" not in data and legacy:
        if data.get("deleted") is True and "name" not in data:
            return TaskRecord(name=name, revision=0, spec=None, source="admin")
        data = {"revision": 0, "source": "admin", "spec": data}
    revision, source = data.get("revision"), data.get("source")
    spec, error = data.get("spec"), data.get("error")
    if type(revision) is not int or revision < 0:
        raise ValueError(f"revision {revision!r} is not an integer >= 0")
    if source not in SOURCES:
        raise ValueError(f"source {source!r} is not one of {SOURCES}")
    if spec is not None and not isinstance(spec, dict):
        raise ValueError(f"spec is a {type(spec).__name__}, not an object or null")
    if spec is not None and spec.get("name") != name:
        raise ValueError(f"its spec names task {spec.get('name')!r}")
    if error is not None and not isinstance(error, str):
        raise ValueError(f"error is a {type(error).__name__}, not a string or null")
    return TaskRecord(name=name, revision=revision, spec=spec, source=source, error=error)


def conflict(name: str, revision: int, damaged: bool) -> ConflictError:
    what = "a damaged record" if damaged else "a spec"
    return ConflictError(f"task {name!r} exists (revision {revision}, {what}); replace or delete it instead")


def stale(name: str, current: int, expect: int) -> PreconditionFailedError:
    return PreconditionFailedError(f"task {name!r} is at revision {current}, not {expect}; read it again and retry")


# --- the store -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Damaged:
    reason: str


class LocalStore(StateStore):
    """The state store in `state_dir`, for the processes of one host (see the module docstring)."""

    def __init__(self, state_dir: Path) -> None:
        self.url = "local"
        self.state_dir = Path(state_dir)
        self.tasks_dir = self.state_dir / "tasks"
        self.blob_dir = self.state_dir / "caches"
        self.jobs_dir = self.state_dir / "jobs"
        self._lock_path = self.state_dir / ".lock"
        self._counter_path = self.state_dir / "revision"
        self._thread_lock = threading.Lock()
        with self._io("create the state dir"):
            for folder in (self.tasks_dir, self.blob_dir, self.jobs_dir):
                folder.mkdir(parents=True, exist_ok=True)
        pending = self.tasks_dir / "pending"
        with contextlib.suppress(OSError):
            if pending.is_dir() and any(pending.iterdir()):
                log.warning("tasks/pending/ holds files of an earlier version; they are ignored "
                            "(an unfinished change from then was never applied)")

    # --- plumbing ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _io(self, what: str) -> Iterator[None]:
        """OSErrors (full disk, permissions) as UnavailableError, naming no absolute path."""
        try:
            yield
        except OSError as exc:
            raise UnavailableError(
                f"the local state store cannot {what} ({exc.strerror or type(exc).__name__})"
            ) from exc

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The threads of this process, then the processes of this host, one at a time (not reentrant)."""
        with self._thread_lock:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    def _task_path(self, name: str) -> Path:
        return self.tasks_dir / f"{name}.json"

    @staticmethod
    def _write_file(path: Path, data: bytes, mtime: float | None = None) -> None:
        def write(tmp: Path) -> None:
            tmp.write_bytes(data)
            if mtime is not None:  # before the rename: a sweep never sees the file unexpired-yet-old
                os.utime(tmp, (mtime, mtime))

        write_atomic(path, write)

    # --- the revision counter -----------------------------------------------------------------------

    def _read_counter(self) -> int | None:
        try:
            text = self._counter_path.read_text(encoding="ascii").strip()
            value = int(text)
            return value if value >= 0 else None
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return None

    def _highest_revision(self) -> int:
        """The highest revision among readable records: the counter when its file is missing or damaged."""
        highest = 0
        for name in self._names():
            record = self._read(name)
            if isinstance(record, TaskRecord):
                highest = max(highest, record.revision)
        return highest

    def _next_revision_locked(self) -> int:
        current = self._read_counter()
        if current is None:
            if self._counter_path.exists():
                log.warning("the revision counter file was damaged; recomputed from the task records")
            current = self._highest_revision()
        new = current + 1
        # the counter is written before the record: a crash between them skips a revision, never reuses one
        self._write_file(self._counter_path, f"{new}\n".encode())
        return new

    def changes(self) -> int:
        with self._io("read the revision counter"):
            value = self._read_counter()
            return value if value is not None else self._highest_revision()

    def wait_for_change(self, seen: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            current = self.changes()
            remaining = deadline - time.monotonic()
            if current != seen or remaining <= 0:
                return current
            time.sleep(min(POLL_S, remaining))

    # --- task records -------------------------------------------------------------------------------

    def _names(self) -> list[str]:
        names = []
        for path in self.tasks_dir.glob("*.json"):
            name = path.name[: -len(".json")]
            if TASK_NAME.fullmatch(name) and path.is_file():
                names.append(name)
        return sorted(names)

    def _read(self, name: str) -> TaskRecord | _Damaged | None:
        path = self._task_path(name)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UnavailableError(
                f"the local state store cannot read tasks/{name}.json ({exc.strerror or type(exc).__name__})"
            ) from exc
        try:
            return decode_record(name, json.loads(raw.decode("utf-8")), legacy=True)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            reason = str(exc) if type(exc) is ValueError else one_line(exc)
            return _Damaged(" ".join(reason.split()))

    def _store_locked(self, name: str, spec: dict[str, Any] | None, source: Source,
                      error: str | None = None) -> TaskRecord:
        revision = self._next_revision_locked()
        data: dict[str, Any] = {"revision": revision, "source": source, "spec": spec}
        if error is not None:
            data["error"] = error
        self._write_file(self._task_path(name), json.dumps(data, ensure_ascii=False, indent=1).encode())
        return TaskRecord(name=name, revision=revision, spec=spec, source=source, error=error)

    def _repair_locked(self, name: str, damage: _Damaged) -> TaskRecord:
        """Quarantine a damaged record file and put a record that says so in its place."""
        moved = quarantine(self._task_path(name), self.state_dir)
        error = f"tasks/{name}.json was damaged ({damage.reason}); moved to {moved}"
        log.error("task %s: %s", name, error)
        return self._store_locked(name, None, "admin", error)

    def _current(self, name: str) -> TaskRecord | None:
        """The record, repairing a damaged file first (under the lock)."""
        record = self._read(name)
        if not isinstance(record, _Damaged):
            return record
        with self._io(f"repair tasks/{name}.json"), self._locked():
            record = self._read(name)  # another process may have repaired or replaced it meanwhile
            return self._repair_locked(name, record) if isinstance(record, _Damaged) else record

    def records(self) -> dict[str, TaskRecord]:
        with self._io("list tasks/"):
            names = self._names()
        found = {}
        for name in names:
            record = self._current(name)
            if record is not None:
                found[name] = record
        return found

    def record(self, name: str) -> TaskRecord | None:
        """None too for a name that is not a valid task name (it can never have been written)."""
        if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
            return None
        return self._current(name)

    def write(self, name: str, spec: dict[str, Any] | None, source: Source, expect: int | None) -> TaskRecord:
        check_write(name, spec, source, expect)
        with self._io(f"write tasks/{name}.json"), self._locked():
            current = self._read(name)
            if isinstance(current, _Damaged):
                current = self._repair_locked(name, current)
            if expect == ABSENT and current is not None and current.live:
                raise conflict(name, current.revision, current.error is not None)
            if expect is not None and expect >= 0:
                revision = 0 if current is None else current.revision
                if revision != expect:
                    raise stale(name, revision, expect)
            return self._store_locked(name, spec, source)

    # --- blobs --------------------------------------------------------------------------------------

    def _blob_path(self, name: str) -> Path:
        return self.blob_dir / check_blob_name(name)

    def get_blob(self, name: str) -> bytes | None:
        path = self._blob_path(name)
        with self._io(f"read caches/{name}"):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                return None
            with contextlib.suppress(FileNotFoundError):  # collected by another process meanwhile
                os.utime(path)
            return data

    def put_blob(self, name: str, data: bytes) -> None:
        path = self._blob_path(name)
        with self._io(f"write caches/{name}"):
            self._write_file(path, bytes(data))

    def quarantine_blob(self, name: str) -> str:
        """Returns `quarantine/<name>.<UTC time>` (relative to the state dir)."""
        path = self._blob_path(name)
        with self._io(f"quarantine caches/{name}"):
            try:
                return quarantine(path, self.state_dir)
            except FileNotFoundError:
                return f"nowhere (caches/{name} was already gone)"

    def blob_ages(self) -> dict[str, float]:
        now, ages = time.time(), {}
        with self._io("list caches/"):
            for path in self.blob_dir.iterdir():
                if not BLOB_NAME.fullmatch(path.name):  # write_atomic's temporaries start with '.'
                    continue
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                if path.is_file():
                    ages[path.name] = max(0.0, now - stat.st_mtime)
        return ages

    def delete_blob(self, name: str) -> int:
        path = self._blob_path(name)
        with self._io(f"delete caches/{name}"):
            try:
                size = path.stat().st_size
                path.unlink()  # another process may collect it first: then it freed the bytes, not us
            except FileNotFoundError:
                return 0
            fsync_directory(self.blob_dir)
            return size

    # --- jobs ---------------------------------------------------------------------------------------

    def _job_path(self, job_id: str) -> Path:
        return self.jobs_dir / f"{check_job_id(job_id)}.json"

    def _plot_path(self, job_id: str, name: str) -> Path:
        return self.jobs_dir / f"{check_job_id(job_id)}.{check_job_id(name, 'plot name')}.png"

    def _cancel_path(self, job_id: str) -> Path:
        return self.jobs_dir / f"{check_job_id(job_id)}.cancel"

    def _sweep(self) -> None:
        """Delete files under jobs/ whose time passed (their mtime is when they expire)."""
        now = time.time()
        for path in self.jobs_dir.iterdir():
            try:
                mtime = path.stat().st_mtime
            except FileNotFoundError:
                continue
            expired = mtime < now - STALE_TEMP_S if path.name.startswith(".") else mtime <= now
            if expired and path.is_file():
                remove_durably(path)

    def put_job(self, job_id: str, record: dict[str, Any], ttl_s: float) -> None:
        path = self._job_path(job_id)
        expires = time.time() + ttl_s
        data = json.dumps({"expires": expires, "record": record}, ensure_ascii=False).encode()
        with self._io(f"write jobs/{job_id}.json"):
            self._write_file(path, data, mtime=expires)
            self._sweep()

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        path = self._job_path(job_id)
        with self._io(f"read jobs/{job_id}.json"):
            try:
                data = json.loads(path.read_bytes().decode("utf-8"))
                expires, record = data["expires"], data["record"]
                if not isinstance(record, dict) or not isinstance(expires, int | float):
                    raise ValueError("not a job record")
            except FileNotFoundError:
                return None
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("jobs/%s.json is unreadable (%s); treated as missing", job_id, one_line(exc))
                return None
            return record if expires > time.time() else None  # an expired file goes at the next sweep

    def put_plot(self, job_id: str, name: str, png: bytes, ttl_s: float) -> None:
        path = self._plot_path(job_id, name)
        with self._io(f"write the plot {name} of job {job_id}"):
            self._write_file(path, bytes(png), mtime=time.time() + ttl_s)

    def get_plot(self, job_id: str, name: str) -> bytes | None:
        path = self._plot_path(job_id, name)
        with self._io(f"read the plot {name} of job {job_id}"):
            try:
                if path.stat().st_mtime <= time.time():
                    return None
                return path.read_bytes()
            except FileNotFoundError:
                return None

    def request_cancel(self, job_id: str) -> None:
        path = self._cancel_path(job_id)
        with self._io(f"write jobs/{job_id}.cancel"):
            self._write_file(path, b"", mtime=time.time() + CANCEL_TTL_S)
            with self._locked():
                self._next_revision_locked()

    def cancel_requested(self, job_ids: list[str]) -> set[str]:
        now, asked = time.time(), set()
        with self._io("read cancel requests in jobs/"):
            for job_id in job_ids:
                try:
                    if self._cancel_path(job_id).stat().st_mtime > now:
                        asked.add(job_id)
                except FileNotFoundError:
                    continue
        return asked

    def close(self) -> None:
        pass

