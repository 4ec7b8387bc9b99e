"""What every backend checks before it stores and after it reads: names, write arguments, and the
stored form of a task record."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from anchor_cache.errors import ConflictError, PreconditionFailedError, ValidationError

ABSENT = -1  # `expect` for a create: the name must have no live record
Source = Literal["config", "admin"]
SOURCES = ("config", "admin")
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # job ids and plot names
BLOB_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}")  # no '/', no leading '.'
CANCEL_TTL_S = 86400.0  # how long a cancel request waits for the replica running its job


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


def typed_line(reason: object) -> str:
    """An exception, named by its type, or a message on one line: for a log or a stored reason,
    where the type says what failed (anchor_cache.arguments.one_line is the user-facing form)."""
    if isinstance(reason, BaseException):
        text = " ".join(str(reason).split())
        return f"{type(reason).__name__}: {text}" if text else type(reason).__name__
    return " ".join(str(reason).split())


def is_task_name(name: object) -> bool:
    return isinstance(name, str) and TASK_NAME.fullmatch(name) is not None


def check_task_name(name: str) -> str:
    if not is_task_name(name):
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


def decode_record(name: str, data: object) -> TaskRecord:
    """A stored record as a TaskRecord; ValueError (a one-line reason) if it is not a valid one."""
    if not isinstance(data, dict):
        raise ValueError(f"not a JSON object but {type(data).__name__}")
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


def parse_record(name: str, raw: bytes) -> TaskRecord | str:
    """The record a backend stored as `raw` JSON, or why it cannot be read (one line)."""
    try:
        return decode_record(name, json.loads(raw.decode("utf-8")))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return " ".join(str(exc).split()) if type(exc) is ValueError else typed_line(exc)


def stored_specs(records: dict[str, TaskRecord]) -> tuple[dict[str, tuple[int, dict[str, Any]]], list[str]]:
    """What garbage collection must keep blobs for: each live spec by name with its revision, and
    the names whose record could not be read (their keys are unknown)."""
    specs = {r.name: (r.revision, r.spec) for r in records.values() if r.spec is not None}
    return specs, [r.name for r in records.values() if r.error is not None]
