"""The tasks one model serves, each with its classifier and persisted anchor cache.

Preparing a task (loading or building its cache) is slow and touches no shared state; swapping the
prepared task in is a single dict assignment. So a replacement builds while the old version keeps
serving, and a failed build leaves the old version in place.
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
from anchor_cache.errors import NotFoundError, ValidationError
from anchor_cache.models import LoadedModel
from anchor_cache.storage import (
    cache_identity,
    cache_key,
    find_beta,
    find_cache,
    save_beta,
    save_cache,
    write_atomic,
)
from anchor_cache.task import Method, TaskSpec

log = logging.getLogger(__name__)


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
    reweighting: dict[str, Any] | None = None  # how β was trained (loss curve, time, examples)
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


class TaskRegistry:
    def __init__(self, lm: LoadedModel, state_dir: Path, max_tasks: int, max_demo_tokens: int) -> None:
        self.lm = lm
        self.cache_dir = state_dir / "caches"
        self.spec_dir = state_dir / "tasks"
        self.max_tasks = max_tasks
        self.max_demo_tokens = max_demo_tokens
        self._tasks: dict[str, ServedTask] = {}

    def prepare(self, spec: TaskSpec) -> ServedTask:
        """Validate the task and load (or build and persist) its cache; registers nothing."""
        start = time.perf_counter()
        clf = Classifier(self.lm, spec)
        n_demo = len(clf.prompt.context.ids)
        if n_demo > self.max_demo_tokens:
            raise ValidationError(
                f"task {spec.name!r}: demonstrations take {n_demo} tokens, the limit is {self.max_demo_tokens}"
            )
        identity = cache_identity(self.lm, clf.prompt, spec.method, clf.seed)
        key, loaded = cache_key(identity), False
        if spec.method in CACHED_METHODS:
            cache = find_cache(self.cache_dir, identity, self.lm)
            loaded = cache is not None
            if loaded:
                clf.install_cache(spec.method, cache)
            else:
                save_cache(self.cache_dir, clf.prefix(spec.method).cache, identity, self.lm.name)
        prefix = clf.prefix(spec.method)
        stored = find_beta(self.cache_dir, key, self.lm)
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
            *(stored or (None, None)),
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
        save_beta(self.cache_dir, served.key, served.beta, served.reweighting or {})

    def put(self, served: ServedTask) -> None:
        if served.spec.name not in self._tasks and len(self._tasks) >= self.max_tasks:
            raise ValidationError(f"already serving {self.max_tasks} tasks (max_tasks); delete one first")
        self._tasks[served.spec.name] = served

    def remove(self, name: str) -> ServedTask:
        self.get(name)
        return self._tasks.pop(name)

    def get(self, name: str) -> ServedTask:
        try:
            return self._tasks[name]
        except KeyError:
            raise NotFoundError(f"unknown task {name!r}; known tasks: {sorted(self._tasks)}") from None

    def all(self) -> list[ServedTask]:
        return list(self._tasks.values())

    # --- runtime changes survive restarts ---------------------------------------------------------

    def persist(self, spec: TaskSpec) -> None:
        """Record a task created or replaced at runtime (atomic write)."""
        text = spec.model_dump_json(indent=1)
        write_atomic(self.spec_dir / f"{spec.name}.json", lambda p: p.write_text(text, encoding="utf-8"))

    def persist_deletion(self, name: str) -> None:
        """A tombstone, so a deleted configured task stays deleted after a restart."""
        write_atomic(self.spec_dir / f"{name}.json", lambda p: p.write_text('{"deleted": true}', encoding="utf-8"))

    def startup_specs(self, configured: list[TaskSpec]) -> list[TaskSpec]:
        """Configured tasks with runtime replacements, additions and deletions applied."""
        specs = {s.name: s for s in configured}
        for path in sorted(self.spec_dir.glob("*.json")) if self.spec_dir.is_dir() else []:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if data.get("deleted"):
                    specs.pop(path.stem, None)
                else:
                    spec = TaskSpec.model_validate(data)
                    specs[spec.name] = spec
            except (OSError, ValueError) as exc:
                log.error("ignoring unreadable persisted task %s: %s", path, exc)
        return list(specs.values())
