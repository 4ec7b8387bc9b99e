"""What the app holds: settings, metrics, and, once loading finishes, the model's tasks and scheduler.

Loading runs in a background thread so /health answers while the model converts or loads; /ready
turns 200 only when every configured task is ready.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from anchor_cache.models import load_model
from anchor_cache.registry import ServedTask, TaskRegistry
from anchor_cache.task import Method
from server.errors import Unavailable
from server.jobs import JobRunner
from server.metrics import Metrics
from server.scheduler import BatchLimits, Scheduler
from server.settings import Settings

log = logging.getLogger(__name__)


class ServerState:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.registry: TaskRegistry | None = None
        self.scheduler: Scheduler | None = None
        self.startup_error: str | None = None
        self.started = time.monotonic()
        self.ready_after_s: float | None = None
        self.model_name = settings.model
        self.jobs = JobRunner()
        self.building: set[str] = set()  # task names with a build job running

    @property
    def ready(self) -> bool:
        return self.ready_after_s is not None

    def _run_batch(self, task: ServedTask, method: Method, queries: list[list[int]]) -> torch.Tensor:
        return task.classifier.label_logits_ids(
            queries, method, batch_size=self.settings.max_batch_size, beta=task.beta_for(method)
        )

    def _load(self) -> TaskRegistry:
        s = self.settings
        lm = load_model(s.model, s.device, s.dtype)
        self.model_name = lm.name
        registry = TaskRegistry(lm, s.state_dir, s.max_tasks, s.max_demo_tokens)
        for spec in registry.startup_specs(s.tasks):
            served = registry.prepare(spec)
            registry.put(served)
            self.track(served)
        return registry

    def track(self, served: ServedTask) -> None:
        name = served.spec.name
        self.metrics.cache_bytes.labels(name).set(served.cache_bytes)
        self.metrics.task_loads.labels(name, "disk" if served.loaded_from_disk else "built").inc()

    def forget(self, name: str) -> None:
        with contextlib.suppress(KeyError):
            self.metrics.cache_bytes.remove(name)

    async def start(self) -> None:
        s = self.settings
        limits = BatchLimits(s.max_batch_size, s.max_batch_tokens, s.max_wait_ms / 1000, s.max_queued_requests)
        self.scheduler = Scheduler(self._run_batch, limits, self.metrics)
        self.scheduler.start()
        try:
            self.registry = await self.scheduler.run_exclusive(self._load)
        except Exception as exc:
            self.startup_error = f"start-up failed: {exc}"
            log.error(self.startup_error)
            return
        self.ready_after_s = time.monotonic() - self.started
        log.info("ready after %.1fs: tasks %s", self.ready_after_s, [t.spec.name for t in self.registry.all()])

    async def stop(self) -> None:
        await self.jobs.shutdown()
        if self.scheduler is not None:
            await self.scheduler.stop()

    def require_ready(self) -> TaskRegistry:
        if self.registry is None or not self.ready:
            raise Unavailable(self.startup_error or "the model and tasks are still loading; retry shortly")
        return self.registry

