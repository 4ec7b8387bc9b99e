"""The task service: create, replace and delete tasks, and learn their re-weighting β, as jobs.

A build prepares the new task off to the side (on the model thread, between batches) and swaps it
in only when it succeeded, so the old version keeps serving during a replacement and stays if the
build fails. The spec is persisted as pending before the build starts, so an accepted (202) build
that a crash or SIGTERM interrupts is built at the next start. Writes to one task name are
serialised: a second write while one is building or training gets 409. β trains in a nice-19
thread while classification goes on and is swapped in (and persisted) only when training
finished; a failed or cancelled run leaves the previous β serving. Replaced and deleted caches are
garbage-collected once no spec refers to them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import numpy as np

from anchor_cache.data import read_jsonl, training_draw
from anchor_cache.errors import ConflictError, ValidationError
from anchor_cache.registry import ServedTask
from anchor_cache.reweighting import TrainConfig, train_reweighting
from anchor_cache.task import Method, TaskSpec, label_index
from server.datafiles import dataset_file, inline_demonstrations
from server.engine import Engine
from server.jobs import Job, JobRunner, in_background_thread
from server.metrics import Metrics
from server.protocol import ReweightRequest, TaskInfo
from server.settings import Settings

log = logging.getLogger(__name__)

class TaskService:
    def __init__(self, engine: Engine, jobs: JobRunner, settings: Settings, metrics: Metrics) -> None:
        self.engine = engine
        self.jobs = jobs
        self.settings = settings
        self.metrics = metrics
        self.building: set[str] = set()  # task names with a build or training job running

    # --- reading --------------------------------------------------------------------------------

    def info(self, served: ServedTask) -> TaskInfo:
        spec = served.spec
        return TaskInfo(
            name=spec.name, labels=spec.labels, template=spec.template, separator=spec.separator, method=spec.method,
            anchor_tokens=served.anchor_tokens, cache_bytes=served.cache_bytes,
            cache_hash=served.key if served.cached else None, build_seconds=round(served.build_seconds, 4),
            loaded_from_disk=served.loaded_from_disk, calibrate=spec.calibrate, reweighted=served.beta is not None,
            reweighting=served.reweighting, **self.engine.task_facts(served),
        )

    def get(self, name: str) -> TaskInfo:
        return self.info(self.engine.task(name))

    def all(self) -> tuple[list[TaskInfo], dict[str, str]]:
        """Serving tasks, and the tasks that failed to load with the reason."""
        return [self.info(t) for t in self.engine.tasks()], self.engine.failures()

    # --- writing --------------------------------------------------------------------------------

    async def write(self, spec: TaskSpec, replace: bool) -> Job:
        """Start a create (or a replace, when `replace`) job; the caller may wait a little for it."""
        registry = self.engine.require_ready()
        exists = spec.name in {t.spec.name for t in registry.all()} | set(registry.failures())
        if spec.name in self.building:
            raise ConflictError(f"task {spec.name!r} is already being built; wait for that job to finish")
        if exists and not replace:
            raise ConflictError(f"task {spec.name!r} exists; use PUT /admin/tasks/{spec.name} to replace it")
        if spec.method == Method.HIDDEN_RANDOM_TOP:
            raise ValidationError("method hidden_random_top is an evaluation method (it needs a dev set); "
                                  "serve hidden_anchor or hidden_random")
        self.building.add(spec.name)  # claimed before any await, so a concurrent write gets 409
        try:
            spec = await asyncio.to_thread(inline_demonstrations, self.settings, spec)
            overhead = self.engine.template_tokens(spec)
            if overhead > self.settings.max_input_tokens:
                raise ValidationError(f"the template alone takes {overhead} tokens, more than max_input_tokens "
                                      f"({self.settings.max_input_tokens}): every classify would fail")
            await asyncio.to_thread(registry.persist_pending, spec)
        except BaseException:
            self.building.discard(spec.name)
            raise
        kind = "replace_task" if exists else "create_task"
        return self.jobs.submit(kind, spec.name, lambda _: self._apply(spec))

    async def _apply(self, spec: TaskSpec) -> dict[str, Any]:
        """Build, persist, then serve: a spec is on disk before its version answers, so a restart
        never reverts a version that served."""
        registry = self.engine.require_ready()
        try:
            served = await self.engine.build(spec)
            registry.check_room(spec.name)
            await asyncio.to_thread(registry.commit, spec)
            registry.put(served)
        except Exception:  # a failed build; a cancelled one (shutdown) keeps its pending spec for the next start
            await asyncio.to_thread(registry.discard_pending, spec.name)
            raise
        finally:
            self.building.discard(spec.name)
        self.engine.track(served)
        await self._collect_garbage()
        return self.info(served).model_dump()

    async def delete(self, name: str) -> None:
        registry = self.engine.require_ready()
        if name in self.building:
            raise ConflictError(f"task {name!r} is being built; wait for that job to finish")
        registry.remove(name)
        await asyncio.to_thread(registry.persist_deletion, name)
        self.metrics.forget_task(name)
        await self._collect_garbage()

    async def _collect_garbage(self) -> None:
        """Best effort: the change is already persisted, so a failed collection is only logged."""
        try:
            await self.engine.collect_garbage()
        except Exception:
            log.exception("garbage collection failed; it runs again after the next change")

    # --- re-weighting ---------------------------------------------------------------------------

    async def reweight(self, name: str, body: ReweightRequest) -> Job:
        served = self.engine.task(name)
        if name in self.building:
            raise ConflictError(f"task {name!r} has a build or training job running; wait for it")
        self.engine.check_reweightable(served)
        self.building.add(name)  # claimed before any await, so a concurrent write gets 409
        try:
            texts, labels = await asyncio.to_thread(self._training_rows, body, served)
        except BaseException:
            self.building.discard(name)
            raise
        return self.jobs.submit("reweighting", name, lambda cancel: self._train(served, body, texts, labels, cancel))

    def _training_rows(self, body: ReweightRequest, served: ServedTask) -> tuple[list[str], list[int]]:
        """Training rows as (texts, classes), never including a demonstration text."""
        labels = served.spec.labels
        demo_texts = self.engine.demonstration_texts(served)
        if body.examples is not None:
            rows = [(e.text, label_index(e.label, labels)) for e in body.examples if e.text not in demo_texts]
        else:
            train = read_jsonl(dataset_file(self.settings, body.data.path, "train"), labels)
            used = {i for i, r in enumerate(train) if r.text in demo_texts}
            rows = [(r.text, r.label) for r in training_draw(train, used, len(labels), body.data.per_class,
                                                              body.data.seed)]
        if not rows:
            raise ValidationError("no training examples left (examples equal to demonstrations are dropped)")
        if len(rows) > self.settings.max_train_examples:
            raise ValidationError(f"{len(rows)} training examples; the limit is {self.settings.max_train_examples}")
        return [t for t, _ in rows], [c for _, c in rows]

    async def _train(self, served: ServedTask, body: ReweightRequest, texts: list[str], labels: list[int],
                     cancel: threading.Event) -> dict[str, Any]:
        """Train in a nice-19 thread (classification keeps flowing), then swap β in if the task is unchanged."""
        registry = self.engine.require_ready()
        name = served.spec.name
        n_dev = int(len(texts) * body.dev_fraction)
        order = np.random.default_rng(body.seed).permutation(len(texts))
        dev_idx, train_idx = order[:n_dev], order[n_dev:]
        cfg = TrainConfig(method=served.spec.method, lr=body.lr, epochs=body.epochs, batch_size=body.batch_size,
                          seed=body.seed, patience=body.patience)

        def work() -> ServedTask:
            result = train_reweighting(
                served.classifier, [texts[i] for i in train_idx], [labels[i] for i in train_idx], cfg,
                dev=([texts[i] for i in dev_idx], [labels[i] for i in dev_idx]) if n_dev else None,
                progress=False, should_stop=cancel.is_set,
            )
            info = {"seconds": round(result.seconds, 3), "epoch_losses": result.epoch_losses,
                    "step_losses": result.step_losses, "dev_losses": result.dev_losses,
                    "train_examples": len(train_idx), "dev_examples": n_dev, "lr": body.lr, "epochs": body.epochs,
                    "batch_size": body.batch_size, "trained_at": time.time()}
            return registry.with_beta(served, result.beta, info)

        try:
            trained = await in_background_thread(work, "anchorserve-training")
            if registry.get(name).key != served.key:
                raise ConflictError(f"task {name!r} was replaced during training; the new β was discarded")
            await asyncio.to_thread(registry.save_beta, trained)
            registry.put(trained)
        finally:
            self.building.discard(name)
        return {"task": name} | trained.reweighting
