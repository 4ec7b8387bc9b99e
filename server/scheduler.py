"""Micro-batching: one worker thread owns the model; the event loop only queues and waits.

Requests are tokenised before they are queued (TEI's split). The batching task takes the oldest
request, adds queued requests for the same (task, method) until `max_batch_size` inputs or
`max_batch_tokens` padded tokens, waiting at most `max_wait_ms` for more, and runs the forward in
the worker thread. A full queue refuses at once (429). A request whose client left or whose
deadline passed is cancelled and skipped if it has not run yet. If a batch fails, every request in
it gets the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from anchor_cache.task import Method
from server.errors import Overloaded, Unavailable
from server.metrics import Metrics

log = logging.getLogger(__name__)

# Called on the model thread with the task object the requests were admitted against, so a task
# replaced while they waited still answers them with the labels they were tokenised for.
RunBatch = Callable[[Any, Method, list[list[int]]], torch.Tensor]


@dataclass(eq=False)
class Entry:
    task: Any
    method: Method
    queries: list[list[int]]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def longest(self) -> int:
        return max(len(q) for q in self.queries)


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int
    max_batch_tokens: int
    max_wait_s: float
    max_queued: int


class Scheduler:
    def __init__(self, run_batch: RunBatch, limits: BatchLimits, metrics: Metrics) -> None:
        self.run_batch = run_batch
        self.limits = limits
        self.metrics = metrics
        self._queue: deque[Entry] = deque()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anchorserve-model")
        self._loop_task: asyncio.Task | None = None
        self._closing = False
        self._in_flight = 0

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._batch_loop(), name="anchorserve-batcher")

    async def submit(self, task: Any, method: Method, queries: list[list[int]]) -> asyncio.Future:
        """Queue a request; the returned future resolves to its (N, C) logits."""
        if self._closing:
            raise Unavailable("the server is shutting down")
        if self._in_flight >= self.limits.max_queued:
            self.metrics.failures.labels("overloaded").inc()
            raise Overloaded(f"{self._in_flight} requests in flight (max_queued_requests); retry later")
        entry = Entry(task, method, queries, asyncio.get_running_loop().create_future())
        self._in_flight += 1
        entry.future.add_done_callback(self._done)
        self._queue.append(entry)
        self.metrics.queue_size.set(len(self._queue))
        self._wake.set()
        return entry.future

    def run_exclusive(self, fn: Callable[[], object]) -> asyncio.Future:
        """Run `fn` on the model thread between batches (cache builds must not race a forward)."""
        return asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _done(self, _: asyncio.Future) -> None:
        self._in_flight -= 1

    def _take_batch(self) -> list[Entry]:
        """The oldest live entry plus compatible queued ones, within the size and token budgets."""
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()  # cancelled: client gone or deadline passed
        if not self._queue:
            return []
        first = self._queue.popleft()
        batch, n, longest = [first], len(first.queries), first.longest
        for entry in list(self._queue):
            if entry.future.done() or entry.task is not first.task or entry.method != first.method:
                continue
            size, top = n + len(entry.queries), max(longest, entry.longest)
            if size > self.limits.max_batch_size or size * top > self.limits.max_batch_tokens:
                break
            self._queue.remove(entry)
            batch.append(entry)
            n, longest = size, top
        return batch

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.limits.max_wait_s and len(self._queue) < self.limits.max_batch_size:
                await asyncio.sleep(self.limits.max_wait_s)  # let concurrent requests join the batch
            while batch := self._take_batch():
                self.metrics.queue_size.set(len(self._queue))
                start = time.perf_counter()
                for entry in batch:
                    self.metrics.queue_seconds.observe(start - entry.enqueued)
                queries = [q for entry in batch for q in entry.queries]
                self.metrics.batch_size.observe(len(queries))
                try:
                    logits = await loop.run_in_executor(
                        self._executor, self.run_batch, batch[0].task, batch[0].method, queries
                    )
                except Exception as exc:  # every entry of a failed batch gets the error
                    log.exception("batch of %d failed", len(batch))
                    for entry in batch:
                        if not entry.future.done():
                            entry.future.set_exception(exc)
                    continue
                finally:
                    self.metrics.inference_seconds.observe(time.perf_counter() - start)
                offset = 0
                for entry in batch:
                    part = logits[offset : offset + len(entry.queries)]
                    offset += len(entry.queries)
                    if not entry.future.done():
                        entry.future.set_result(part)
            if self._closing and not self._queue:
                return

    async def stop(self) -> None:
        """Refuse new requests, finish queued ones, then stop the worker."""
        self._closing = True
        self._wake.set()
        if self._loop_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        self._executor.shutdown(wait=True)
