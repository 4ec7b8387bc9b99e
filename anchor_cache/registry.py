"""The tasks one model serves, each with its classifier and persisted anchor cache, and the state dir
that makes them survive restarts, crashes and damaged files.

Preparing a task (loading or building its cache) is slow and touches no shared state; swapping the
prepared task in is a single dict assignment. So a replacement builds while the old version keeps
serving, and a failed build leaves the old version in place.

State dir layout (names relative to it appear in messages; absolute paths never do):
  tasks/<name>.json          the current runtime spec of a task, or a tombstone {"deleted": true}
  tasks/pending/<name>.json  an accepted create/replace whose build has not finished (a subfolder,
                             since task names may contain dots)
  caches/<key>.safetensors, caches/<key>.beta.safetensors   see storage.py
  quarantine/<file>.<UTC timestamp>   damaged files, moved here and never deleted

A damaged cache is quarantined and rebuilt (caches are derivable). A damaged β is quarantined and the
task serves without it; its `reweighting` info then reads {"lost": "<reason; where it was moved>"}.
At start every task loads on its own: one that cannot is recorded in `failures()` while the rest serve.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from anchor_cache.classifier import CACHED_METHODS, Classifier, calibrate
from anchor_cache.errors import CacheMismatchError, ConflictError, NotFoundError, UnavailableError, ValidationError
from anchor_cache.models import LoadedModel
from anchor_cache.storage import (
    beta_file,
    cache_file,
    cache_identity,
    cache_key,
    collect_garbage,
    find_beta,
    find_cache,
    quarantine,
    remove_durably,
    save_beta,
    save_cache,
    write_atomic,
)
from anchor_cache.task import Method, TaskSpec, preview

log = logging.getLogger(__name__)

TOMBSTONE = {"deleted": True}
START_GC_GRACE_S = 3600.0  # files unused this long are collected at start (another replica may use them)


@dataclass(frozen=True)
class ServedTask:
    spec: TaskSpec
    classifier: Classifier
    key: str  # content hash of model, tokenizer, task and method: names its cache and β
    cache_bytes: int
    anchor_tokens: int
    build_seconds: float
    loaded_from_disk: bool
    beta: torch.Tensor | None = None  # learned re-weighting for spec.method
    # how β was trained (loss curve, time, examples); {"lost": reason} when a damaged β was quarantined
    reweighting: dict[str, Any] | None = None
    content_free: torch.Tensor | None = None  # (C,) log content-free probabilities when spec.calibrate

    @property
    def cached(self) -> bool:
        return self.spec.method in CACHED_METHODS

    def beta_for(self, method: Method) -> torch.Tensor | None:
        """β applies to the method it was trained in; other methods requested per call run without."""
        return self.beta if method == self.spec.method else None

    def scores(self, logits: torch.Tensor, method: Method) -> torch.Tensor:
        """Calibrated label scores for the task's own method when calibration is on, raw otherwise."""
        if self.content_free is None or method != self.spec.method:
            return logits
        return calibrate(logits, self.content_free)


def _one_line(reason: object) -> str:
    """An error message on one line, for logs and failure reports."""
    return " ".join(str(reason).split()) or type(reason).__name__


class TaskRegistry:
    def __init__(self, lm: LoadedModel, state_dir: Path, max_tasks: int, max_demo_tokens: int) -> None:
        self.lm = lm
        self.state_dir = state_dir
        self.cache_dir = state_dir / "caches"
        self.spec_dir = state_dir / "tasks"
        self.pending_dir = self.spec_dir / "pending"
        self.max_tasks = max_tasks
        self.max_demo_tokens = max_demo_tokens
        self._tasks: dict[str, ServedTask] = {}
        self._failed: dict[str, str] = {}  # task name -> why it could not load
        self._configured: list[TaskSpec] = []

    # --- preparing a task -------------------------------------------------------------------------

    def key_of(self, spec: TaskSpec) -> str:
        """The cache key of `spec` under this model (tokenises its demonstrations)."""
        clf = Classifier(self.lm, spec)
        return cache_key(cache_identity(self.lm, clf.prompt, spec.method, clf.seed))

    def prepare(self, spec: TaskSpec) -> ServedTask:
        """Validate the task and load (or build and persist) its cache and β; registers nothing.

        A damaged cache file is quarantined and rebuilt; a damaged β file is quarantined and the
        task comes back without β, its `reweighting` saying {"lost": reason}."""
        start = time.perf_counter()
        clf = Classifier(self.lm, spec)
        n_demo = len(clf.prompt.context.ids)
        if n_demo > self.max_demo_tokens:
            raise ValidationError(
                f"task {spec.name!r}: demonstrations take {n_demo} tokens, the limit is {self.max_demo_tokens}"
            )
        positions = self.lm.max_positions
        query = len(clf.prompt.encode(""))
        if positions is not None and n_demo + query + 1 > positions:
            raise ValidationError(
                f"task {spec.name!r}: demonstrations ({n_demo} tokens) and the template ({query}) leave no room for "
                f"a text within the model's {positions} positions; use fewer or shorter demonstrations"
            )
        identity = cache_identity(self.lm, clf.prompt, spec.method, clf.seed)
        key, loaded = cache_key(identity), False
        if spec.method in CACHED_METHODS:
            try:
                cache = find_cache(self.cache_dir, identity, self.lm)
            except CacheMismatchError as exc:
                self._quarantine(cache_file(self.cache_dir, key), exc, f"task {spec.name}: rebuilding its cache")
                cache = None
            loaded = cache is not None
            if loaded:
                clf.install_cache(spec.method, cache)
            else:
                save_cache(self.cache_dir, clf.prefix(spec.method).cache, identity, self.lm.name)
        beta, info = None, None
        try:
            beta, info = find_beta(self.cache_dir, key, self.lm) or (None, None)
        except CacheMismatchError as exc:
            moved = self._quarantine(beta_file(self.cache_dir, key), exc, f"task {spec.name}: serving without β")
            info = {"lost": f"{exc}; moved to {moved}"}
        prefix = clf.prefix(spec.method)
        served = self.with_beta(
            ServedTask(
                spec=spec,
                classifier=clf,
                key=key,
                cache_bytes=prefix.kv_bytes,
                anchor_tokens=prefix.cache.num_tokens if prefix.cache is not None else 0,
                build_seconds=0.0,
                loaded_from_disk=loaded,
            ),
            beta,
            info,
        )
        served = dataclasses.replace(served, build_seconds=time.perf_counter() - start)
        log.info(
            "task %s ready: %s, cache %d tokens / %d bytes, %s in %.2fs%s", spec.name, spec.method,
            served.anchor_tokens, served.cache_bytes, "loaded from disk" if loaded else "built", served.build_seconds,
            ", with learned β" if served.beta is not None else "",
        )
        return served

    def with_beta(self, served: ServedTask, beta: torch.Tensor | None, info: dict[str, Any] | None) -> ServedTask:
        """The task with β applied; calibration is recomputed under it (computed once, then cached)."""
        content_free = None
        if served.spec.calibrate:
            content_free = served.classifier.content_free_logprobs(served.spec.method, beta)
        return dataclasses.replace(served, beta=beta, reweighting=info, content_free=content_free)

    def save_beta(self, served: ServedTask) -> None:
        """Persist the task's β and training info as one atomic file."""
        save_beta(self.cache_dir, served.key, served.beta, served.reweighting or {})

    # --- the served set ---------------------------------------------------------------------------

    def check_room(self, name: str) -> None:
        """The one max_tasks check: a new name needs a free place (replacing one always fits)."""
        if name not in self._tasks and len(self._tasks) >= self.max_tasks:
            raise ConflictError(f"already serving {self.max_tasks} tasks (max_tasks); delete one first")

    def put(self, served: ServedTask) -> None:
        """Serve `served` (replacing its name); clears a recorded failure of that name."""
        self.check_room(served.spec.name)
        self._tasks[served.spec.name] = served
        self._failed.pop(served.spec.name, None)

    def remove(self, name: str) -> ServedTask | None:
        """Stop serving `name`, or forget its failure; returns the task if it was serving."""
        if name not in self._tasks and name not in self._failed:
            raise NotFoundError(f"unknown task {preview(name)}; known tasks: {sorted(self._tasks)}")
        self._failed.pop(name, None)
        return self._tasks.pop(name, None)

    def get(self, name: str) -> ServedTask:
        if name in self._tasks:
            return self._tasks[name]
        if name in self._failed:
            raise UnavailableError(f"task {name!r} failed to load: {self._failed[name]}")
        raise NotFoundError(f"unknown task {preview(name)}; known tasks: {sorted(self._tasks)}")

    def all(self) -> list[ServedTask]:
        """The serving tasks (failed ones are in `failures()`)."""
        return list(self._tasks.values())

    def failures(self) -> dict[str, str]:
        """Task name -> why it could not load at start; names in no absolute path."""
        return dict(self._failed)

    # --- start-up ---------------------------------------------------------------------------------

    def start(self, configured: list[TaskSpec], gc_grace_s: float = START_GC_GRACE_S) -> None:
        """Load every task (configured, then runtime-persisted by name) independently, then collect
        garbage. A persisted spec replaces or deletes a configured one of its name; a pending spec is
        built and committed, or quarantined and the previous version loaded. A task that cannot load
        is recorded in `failures()`; the others serve."""
        self._configured = list(configured)
        by_name = {spec.name: spec for spec in configured}
        persisted = {p.name.removesuffix(".json") for p in self._spec_files()}
        for name in list(by_name) + sorted(persisted - set(by_name)):
            try:
                self._start_task(name, by_name.get(name))
            except Exception as exc:  # one task that cannot load must leave the others serving
                self._failed[name] = _one_line(exc)
                log.error("task %s failed to load: %s", name, self._failed[name])
        self.collect_garbage(gc_grace_s)
        if self._failed:
            log.error("serving %d tasks; %d failed: %s", len(self._tasks), len(self._failed), sorted(self._failed))

    def _start_task(self, name: str, configured: TaskSpec | None) -> None:
        """Serve `name` from its pending spec, else its persisted one, else its configured one; raises
        why not (a damaged persisted spec never falls back to the configured one)."""
        current, pending = self.spec_dir / f"{name}.json", self.pending_dir / f"{name}.json"
        damaged, previous = None, configured
        if current.is_file():
            try:
                previous = self._read_spec(current, name)
            except CacheMismatchError as exc:
                damaged, previous = exc, None
        failed_change = self._start_pending(name, pending) if pending.is_file() else None
        if name in self._tasks:  # the pending change built and was committed
            return
        if damaged is not None:
            raise damaged
        if previous is not None:
            self.put(self.prepare(previous))
        elif failed_change is not None:
            self._failed[name] = failed_change

    def _start_pending(self, name: str, path: Path) -> str | None:
        """Build, serve and commit the pending spec at `path`; on failure quarantine it and return why."""
        try:
            spec = self._read_spec(path, name)
        except CacheMismatchError as exc:
            return str(exc)
        try:
            if spec is None:
                raise CacheMismatchError("a pending change holds a tombstone instead of a spec")
            self.put(self.prepare(spec))
        except Exception as exc:  # like a failed build at runtime, a failed change keeps the previous version
            moved = self._quarantine(path, exc, f"task {name}: its pending change did not build")
            return f"its accepted change did not build ({_one_line(exc)}); spec moved to {moved}"
        self.commit(spec)
        return None

    def _read_spec(self, path: Path, name: str) -> TaskSpec | None:
        """The spec persisted at `path`, None for a tombstone. A damaged file is quarantined and
        raises CacheMismatchError saying where it went."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data == TOMBSTONE:
                return None
            spec = TaskSpec.model_validate(data)
            if spec.name != name:
                raise ValueError(f"it names task {spec.name!r}")
            return spec
        except (OSError, ValueError) as exc:  # JSON, UTF-8 and pydantic errors are ValueErrors
            reason = f"persisted spec {self._relative(path)} was damaged ({_one_line(exc)})"
            moved = self._quarantine(path, reason, f"task {name}")
            raise CacheMismatchError(f"{reason}; moved to {moved}") from exc

    def _spec_files(self) -> list[Path]:
        return sorted(self.spec_dir.glob("*.json")) + sorted(self.pending_dir.glob("*.json"))

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.state_dir).as_posix()

    def _quarantine(self, path: Path, reason: object, consequence: str) -> str:
        """Move a damaged file to quarantine/ and log one line; returns where it went."""
        moved = quarantine(path, self.state_dir)
        log.error("%s: %s; moved to %s", consequence, _one_line(reason), moved)
        return moved

    # --- runtime changes survive restarts and crashes -------------------------------------------

    def persist_pending(self, spec: TaskSpec) -> None:
        """Record an accepted create/replace before its build starts, so a crash mid-build retries it."""
        self._write_spec(self.pending_dir / f"{spec.name}.json", spec.model_dump_json(indent=1))

    def commit(self, spec: TaskSpec) -> None:
        """After a successful build: make `spec` the persisted current version, then drop its pending file."""
        self._write_spec(self.spec_dir / f"{spec.name}.json", spec.model_dump_json(indent=1))
        remove_durably(self.pending_dir / f"{spec.name}.json")

    def discard_pending(self, name: str) -> None:
        """After a failed build: forget the accepted change (the previous version stays current)."""
        remove_durably(self.pending_dir / f"{name}.json")

    def persist_deletion(self, name: str) -> None:
        """A tombstone, so a deleted configured task stays deleted after a restart; drops any pending change."""
        self._write_spec(self.spec_dir / f"{name}.json", json.dumps(TOMBSTONE))
        remove_durably(self.pending_dir / f"{name}.json")

    @staticmethod
    def _write_spec(path: Path, text: str) -> None:
        write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))

    # --- garbage collection -----------------------------------------------------------------------

    def collect_garbage(self, grace_s: float) -> int:
        """Delete cache and β files whose key no live spec has (served, pending, persisted or
        configured) and that nobody wrote or loaded for `grace_s` seconds; returns the bytes freed.
        While some live spec's key is unknown (a damaged spec file, a missing demonstrations file, a
        failed task whose β an operator may still recover), β files are kept: unlike caches they
        cannot be rebuilt."""
        serving = dict(self._tasks)  # a snapshot: a build may `put` meanwhile
        live = {served.key for served in serving.values()}
        specs, unknown = self._live_specs()
        unknown += [f"{name} (failed to load)" for name in self.failures()]
        for spec in specs:
            served = serving.get(spec.name)
            if served is not None and served.spec == spec:
                continue
            try:
                live.add(self.key_of(spec))
            except Exception as exc:  # a spec that cannot be prepared has no key
                unknown.append(f"{spec.name} ({_one_line(exc)})")
        if unknown:
            log.warning("garbage collection keeps all β files: no key for %s", ", ".join(unknown))
        freed = collect_garbage(self.cache_dir, live, grace_s, keep_beta=bool(unknown))
        if freed:
            log.info("garbage collection freed %d bytes in caches/", freed)
        return freed

    def _live_specs(self) -> tuple[list[TaskSpec], list[str]]:
        """Configured specs and every persisted or pending spec, and the spec files that could not
        be read (`start` quarantines those; here they only mean a key is unknown)."""
        specs, unreadable = list(self._configured), []
        for path in self._spec_files():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if data != TOMBSTONE:
                    specs.append(TaskSpec.model_validate(data))
            except (OSError, ValueError) as exc:
                unreadable.append(f"{self._relative(path)} ({_one_line(exc)})")
        return specs, unreadable
