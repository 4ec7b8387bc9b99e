"""Background jobs for slow admin work (cache builds, β training, analyses): id, status, result.

Work that runs beside classification (β training, analyses) runs in a thread at the lowest CPU
priority, so the scheduler's model thread gets the cores whenever it wants them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from pydantic import BaseModel, Field

from anchor_cache.errors import AnchorServeError, NotFoundError

log = logging.getLogger(__name__)
Status = Literal["pending", "running", "succeeded", "failed", "cancelled"]


class Job(BaseModel):
    id: str = Field(default_factory=lambda: f"job-{uuid.uuid4().hex[:16]}")
    kind: str
    target: str
    status: Status = "pending"
    created: float = Field(default_factory=time.time)
    finished: float | None = None
    error: dict[str, str] | None = None
    result: dict[str, Any] | None = None
    params: dict[str, Any] | None = None
    progress: dict[str, float] | None = Field(None, description="done and total steps, for jobs that count them")
    plots: dict[str, bytes] = Field(default_factory=dict, exclude=True)  # name → PNG, served on their own URLs


class JobRunner:
    """Keeps the last `keep` jobs; each runs as an asyncio task and records its outcome."""

    def __init__(self, keep: int = 256) -> None:
        self.keep = keep
        self._jobs: dict[str, Job] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._cancel: dict[str, threading.Event] = {}

    def submit(
        self, kind: str, target: str, work: Callable[[threading.Event], Awaitable[dict[str, Any]]],
        job: Job | None = None,
    ) -> Job:
        """Run `work(cancel)`; work done in threads should poll the `cancel` event. Pass `job` to fill
        in more of it (params, progress) than kind and target."""
        job = job or Job(kind=kind, target=target)
        self._jobs[job.id] = job
        cancel = self._cancel[job.id] = threading.Event()
        self._tasks[job.id] = asyncio.create_task(self._run(job, lambda: work(cancel)), name=job.id)
        while len(self._jobs) > self.keep:
            oldest = next(iter(self._jobs))
            if self._jobs[oldest].finished is None:
                break
            self._jobs.pop(oldest)
        return job

    async def _run(self, job: Job, work: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        job.status = "running"
        try:
            job.result = await work()
            job.status = "succeeded"
        except asyncio.CancelledError:
            job.status = "cancelled"
        except AnchorServeError as exc:
            job.status = "cancelled" if exc.kind == "cancelled" else "failed"
            job.error = {"error": str(exc), "type": exc.kind}
        except Exception:  # a job's failure is reported, never lost; details go to the log only
            log.exception("job %s (%s %s) failed", job.id, job.kind, job.target)
            job.status, job.error = "failed", {"error": f"internal error; see the server log for {job.id}",
                                               "type": "internal"}
        finally:
            job.finished = time.time()
            self._tasks.pop(job.id, None)
            self._cancel.pop(job.id, None)

    async def wait(self, job: Job, timeout: float) -> None:
        task = self._tasks.get(job.id)
        if task is not None:
            await asyncio.wait({task}, timeout=timeout)

    def cancel(self, job_id: str) -> Job:
        """Ask a running job to stop; threads see the event at their next check."""
        job = self.get(job_id)
        if job.id in self._cancel:
            self._cancel[job.id].set()
        return job

    def active(self, kind: str) -> int:
        return sum(1 for j in self._jobs.values() if j.kind == kind and j.finished is None)

    def get(self, job_id: str) -> Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise NotFoundError(f"unknown job {job_id!r}") from None

    async def shutdown(self) -> None:
        for event in self._cancel.values():
            event.set()
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)


def lower_priority() -> None:
    """Nice 19 for the calling thread: on Linux niceness is per thread and the OpenMP workers it
    starts inherit it, so the model thread serving requests gets the CPU whenever it wants it."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


async def in_background_thread(fn: Callable[[], Any], name: str) -> Any:
    """Run `fn` in its own nice-19 thread and wait for it without blocking the event loop."""
    with ThreadPoolExecutor(1, thread_name_prefix=name, initializer=lower_priority) as pool:
        return await asyncio.get_running_loop().run_in_executor(pool, fn)
