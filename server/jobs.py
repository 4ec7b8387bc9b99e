"""Background jobs for slow admin work (cache builds, β training, analyses): id, status, result.

Work that runs beside classification (β training, analyses) runs in a thread at the lowest CPU
priority, so the thread that runs the scheduler's forwards gets the cores whenever it wants them.

A job runs on the replica that took it; its record (status, progress, result, plot names) and its
plots are copied to the state store at every change of status (progress at each replication tick),
so any replica answers for any job. A cancel asked of another replica goes through the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from pydantic import BaseModel, Field

from anchor_cache.errors import AnchorServeError, NotFoundError, UnavailableError
from server.store import StateStore

log = logging.getLogger(__name__)
Status = Literal["pending", "running", "succeeded", "failed", "cancelled"]
_JOB_ID = re.compile(r"job-[0-9a-f]{16}")


class TooManyJobs(AnchorServeError):
    """A job kind's limit of jobs running at once is reached: refused, to be retried later."""

    kind = "overloaded"


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
    plot_names: list[str] = Field(default_factory=list, description="plots this job made")
    plots: dict[str, bytes] = Field(default_factory=dict, exclude=True)  # name → PNG, served on their own URLs


class JobRunner:
    """Keeps the last `keep` jobs it ran; each runs as an asyncio task and records its outcome here
    and in the store (records there expire after `ttl_s`)."""

    def __init__(self, store: StateStore, ttl_s: float, keep: int = 256) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.keep = keep
        self._jobs: dict[str, Job] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._cancel: dict[str, threading.Event] = {}
        # One write at a time, in order: a tick's progress write that lands after a job's final record
        # would leave it "running" in the store for every other replica.
        self._publishing = asyncio.Lock()

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
        await self._publish(job)
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
            job.plot_names = sorted(job.plots)
            self._tasks.pop(job.id, None)
            self._cancel.pop(job.id, None)
            await self._publish(job, with_plots=True)

    async def _publish(self, job: Job, with_plots: bool = False, progress: bool = False) -> None:
        """Copy the job's record (and plots) to the store; a store that is down only costs a log line.
        A `progress` write is skipped once the job has finished: its final record is already written."""
        async with self._publishing:
            if progress and job.finished is not None:
                return
            record = job.model_dump(mode="json")
            plots = dict(job.plots) if with_plots else {}

            def put() -> None:
                self.store.put_job(job.id, record, self.ttl_s)
                for name, png in plots.items():
                    self.store.put_plot(job.id, name, png, self.ttl_s)

            try:
                await asyncio.to_thread(put)
            except UnavailableError as exc:
                log.warning("job %s: its record stays on this replica only: %s", job.id, exc)

    async def relay(self, store: StateStore) -> None:
        """Each replication tick: running jobs' progress to the store, cancel requests from it."""
        running = [job for job_id, job in self._jobs.items() if job_id in self._tasks]
        for job in running:
            await self._publish(job, progress=True)
        asked = await asyncio.to_thread(store.cancel_requested, [job.id for job in running])
        for job_id in asked:
            if job_id in self._cancel and not self._cancel[job_id].is_set():
                log.info("job %s: cancel requested through the state store", job_id)
                self._cancel[job_id].set()

    async def wait(self, job: Job, timeout: float) -> None:
        task = self._tasks.get(job.id)
        if task is not None:
            await asyncio.wait({task}, timeout=timeout)

    async def cancel(self, job_id: str) -> Job:
        """Ask a running job to stop, here (threads see the event at their next check) or, for a job
        another replica runs, through the store."""
        job = await self.find(job_id)
        if job.id in self._cancel:
            self._cancel[job.id].set()
        elif job.finished is None:
            await asyncio.to_thread(self.store.request_cancel, job.id)
        return job

    def active(self, kind: str) -> int:
        return sum(1 for j in self._jobs.values() if j.kind == kind and j.finished is None)

    async def find(self, job_id: str) -> Job:
        """A job this replica runs or ran, else its record in the store (any replica's)."""
        if job_id in self._jobs:
            return self._jobs[job_id]
        record = await asyncio.to_thread(self.store.get_job, job_id) if _JOB_ID.fullmatch(job_id) else None
        if record is None:
            raise NotFoundError(f"unknown job {job_id!r}")
        return Job.model_validate(record)

    async def plot(self, job: Job, name: str) -> bytes | None:
        """A plot of `job` (found by `find`), from memory or the store."""
        if name in job.plots:
            return job.plots[name]
        if name not in job.plot_names:
            return None
        return await asyncio.to_thread(self.store.get_plot, job.id, name)

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
    """Run `fn` in its own nice-19 thread and wait for it without blocking the event loop. When the
    waiting task is cancelled (a job cancel, shutdown) the thread is left to see its cancel event and
    end on its own: waiting for it here would block the event loop, and with it the shutdown."""
    pool = ThreadPoolExecutor(1, thread_name_prefix=name, initializer=lower_priority)
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, fn)
    finally:
        pool.shutdown(wait=False)
