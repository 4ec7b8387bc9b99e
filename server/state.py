"""What the app holds: settings, metrics, the engine facade, the job runner and the services built
on them, made once per app (vLLM's init_app_state) and reached by routes through `server.deps`."""

from __future__ import annotations

from collections.abc import Callable

from server.analyses import AnalysisService
from server.classify import ClassifyService
from server.engine import Engine
from server.jobs import JobRunner
from server.metrics import Metrics
from server.settings import Settings
from server.tasks import TaskService


class ServerState:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.engine = Engine(settings, self.metrics)
        self.jobs = JobRunner()
        self.classify = ClassifyService(self.engine, settings, self.metrics)
        self.tasks = TaskService(self.engine, self.jobs, settings, self.metrics)
        self.analyses = AnalysisService(self.engine, self.jobs, settings)

    async def start(self, on_fatal: Callable[[], None] | None = None) -> None:
        await self.engine.start(on_fatal)

    async def stop(self) -> None:
        await self.jobs.shutdown()
        await self.engine.stop()
