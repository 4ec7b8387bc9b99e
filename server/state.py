"""What the app holds: settings, metrics, the state store, the engine facade, the job runner, the
replication loop and the services built on them, made once per app (vLLM's init_app_state) and
reached by routes through `server.deps`."""

from __future__ import annotations

from collections.abc import Callable

from anchor_cache.cpus import ThreadFit
from server.analyses import AnalysisService
from server.classify import ClassifyService
from server.core import CoreEndpoint
from server.heap import freeze_startup_heap
from server.inprocess import InProcessEngine
from server.jobs import JobRunner
from server.metrics import Metrics
from server.replication import Replication
from server.settings import Settings
from server.store.url import open_store
from server.tasks import TaskService


class ServerState:
    def __init__(self, settings: Settings, engine_address: str | None = None, thread_fit: ThreadFit | None = None
                 ) -> None:
        self.settings = settings
        self.shown_settings = settings.redacted()  # GET /info's, made once: settings do not change while serving
        self.metrics = Metrics()
        self.store = open_store(settings.state_url.get_secret_value(), settings.state_dir)
        self.engine = InProcessEngine(settings, self.metrics, self.store, behind_frontends=engine_address is not None,
                                     thread_fit=thread_fit)
        self.jobs = JobRunner(self.store, settings.job_ttl_s)
        self.replication = Replication(self.engine, self.store, self.jobs, settings.sync_interval_s)
        self.classify = ClassifyService(self.engine, settings, self.metrics)
        self.tasks = TaskService(self.engine, self.replication, self.jobs, settings)
        self.analyses = AnalysisService(self.engine, self.jobs, settings)
        # An engine core's socket for HTTP frontends (server/frontend.py); None in a single process.
        self.endpoint = CoreEndpoint(self.engine, engine_address, self.metrics) if engine_address else None

    async def start(self, on_fatal: Callable[[], None] | None = None) -> None:
        if self.endpoint is not None:  # frontends connect while the model loads, and hear "unavailable"
            self.endpoint.start()
        await self.engine.start(lambda: self.replication.load(self.settings.tasks, self.settings.gc_grace_s),
                                on_fatal)
        if self.engine.ready:
            self.replication.start()
            self.tasks.finish_from_pools()
            freeze_startup_heap()

    async def stop(self) -> None:
        await self.replication.stop()
        await self.jobs.shutdown()
        await self.engine.stop()
        self.classify.close()
        if self.endpoint is not None:
            await self.endpoint.stop()
        self.store.close()
