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

A record file that cannot be parsed is moved to quarantine/ and replaced, under the lock, by a
record at a new revision whose `error` says so.

Every write goes to a temporary name, is fsynced, renamed over the target and the directory
fsynced, so a crash leaves the previous or the new version, never a mix.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from anchor_cache.errors import UnavailableError
from server.store.base import StateStore
from server.store.records import (
    ABSENT,
    BLOB_NAME,
    CANCEL_TTL_S,
    TASK_NAME,
    Source,
    TaskRecord,
    check_blob_name,
    check_job_id,
    check_write,
    conflict,
    parse_record,
    stale,
    typed_line,
)

log = logging.getLogger(__name__)

POLL_S = 0.1
STALE_TEMP_S = 3600.0  # a write_atomic temporary this old in jobs/ was left by a crash


def fsync_directory(directory: Path) -> None:
    """Make a rename or unlink in `directory` survive a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp_path)`, fsync, rename over `path`, then fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def remove_durably(path: Path) -> None:
    """Unlink `path` (if present; another process may remove it first) and fsync its directory."""
    try:
        path.unlink()
    except FileNotFoundError:
        return
    fsync_directory(path.parent)


def quarantine(path: Path, state_dir: Path) -> str:
    """Move a damaged file to `<state_dir>/quarantine/<name>.<UTC timestamp>` for an operator to
    inspect (never deleted, never overwritten); returns where it went, relative to the state dir."""
    folder = state_dir / "quarantine"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    target = folder / f"{path.name}.{stamp}"
    n = 1
    while target.exists():
        target, n = folder / f"{path.name}.{stamp}.{n}", n + 1
    os.replace(path, target)
    fsync_directory(path.parent)
    fsync_directory(folder)
    return f"quarantine/{target.name}"



# --- the store -----------------------------------------------------------------------------------


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
        for name, raw in self._stored_records().items():
            record = parse_record(name, raw)
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

    def _await_change(self, seen: int, timeout: float) -> None:
        time.sleep(min(POLL_S, timeout))  # one host: polling the counter file is cheap

    # --- task records -------------------------------------------------------------------------------

    def _read_raw(self, name: str) -> bytes | None:
        try:
            return self._task_path(name).read_bytes()
        except FileNotFoundError:
            return None

    def _stored_records(self) -> dict[str, bytes]:
        found = {}
        with self._io("read tasks/"):
            for path in self.tasks_dir.glob("*.json"):
                name = path.name[: -len(".json")]
                raw = self._read_raw(name) if TASK_NAME.fullmatch(name) else None
                if raw is not None:
                    found[name] = raw
        return found

    def _stored_record(self, name: str) -> bytes | None:
        with self._io(f"read tasks/{name}.json"):
            return self._read_raw(name)

    def _store_locked(self, name: str, spec: dict[str, Any] | None, source: Source,
                      error: str | None = None) -> TaskRecord:
        revision = self._next_revision_locked()
        data: dict[str, Any] = {"revision": revision, "source": source, "spec": spec}
        if error is not None:
            data["error"] = error
        self._write_file(self._task_path(name), json.dumps(data, ensure_ascii=False, indent=1).encode())
        return TaskRecord(name=name, revision=revision, spec=spec, source=source, error=error)

    def _current_locked(self, name: str) -> TaskRecord | None:
        """The record as stored now; a damaged file is quarantined and a record that says so put in
        its place."""
        raw = self._read_raw(name)
        if raw is None:
            return None
        record = parse_record(name, raw)
        if isinstance(record, TaskRecord):
            return record
        moved = quarantine(self._task_path(name), self.state_dir)
        error = f"tasks/{name}.json was damaged ({record}); moved to {moved}"
        log.error("task %s: %s", name, error)
        return self._store_locked(name, None, "admin", error)

    def _repair(self, name: str, raw: bytes, reason: str) -> TaskRecord | None:
        with self._io(f"repair tasks/{name}.json"), self._locked():
            return self._current_locked(name)  # another process may have repaired or replaced it meanwhile

    def write(self, name: str, spec: dict[str, Any] | None, source: Source, expect: int | None) -> TaskRecord:
        check_write(name, spec, source, expect)
        with self._io(f"write tasks/{name}.json"), self._locked():
            current = self._current_locked(name)
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
                log.warning("jobs/%s.json is unreadable (%s); treated as missing", job_id, typed_line(exc))
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

