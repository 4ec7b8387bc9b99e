"""Micro-batching: one asyncio task batches requests, one "model thread" (or the event loop's own
thread, in the engine core) runs their forwards.

Requests are tokenised before they are queued (TEI's split). The batching task takes the oldest
live request and adds queued requests, of any task and method, while the batch stays within
`max_batch_size` rows and `max_batch_tokens`, waiting at most `max_wait_s` for more when the
model was idle (after a forward, see "Refilling" below). Rows of
different tasks share one forward: the engine packs them without padding, each row against its
own anchor cache (anchor_cache/packed.py), so many tasks with light traffic still fill a batch. A
row's cost is what its forward attends over: its cached anchor tokens, the tokens it re-encodes
before its query (vanilla's demonstrations, text_anchor's anchor text) and its query. A request
larger than the budget is split into chunks that each fit (one row always runs, alone if it is
over the budget on its own); its chunks run in order, in as many forwards as they need, and its
future resolves with all rows' logits in input order once the last one is done.

Refilling after a forward. Many clients send their next request when they get an answer. With the
CPU's forward the limit, such clients split into two groups that alternate: one group's rows run
while the other's queue, so each forward holds half of them, and a forward of 16 rows costs more
than half of one of 32 (its fixed cost, about 50 ms for the default model at any batch size, is
paid twice). So after a forward that returned its rows where it ran (the CPU; a GPU's launched
forwards overlap instead), the next batch waits for as many rows as it answered to come back, on
top of those queued at its end, for at most `refill_wait_fraction` × the forward's time (the
median of the last few, so that a method's first forward, which also builds its cache, does not
stretch it). It starts at once when they are back, when a batch's rows or tokens are queued, or
when the rest of a split request is next. A lone client's next request starts at once. Whether a
refill pays is measured whether or not one waits: after each such forward, the time until as many
rows as it answered have been submitted (its senders' return time; infinite if the next forward
ended first). The next batch waits only while the median of the last `RETURN_HISTORY` is within
the window. Clients that send on answers come back in a burst after the event loop has sent their
answers (12-19 ms after a 32-row forward of the default model, against a window of 45 ms); traffic
on its own schedule takes about a forward's time to bring that many rows, so it is seldom made to
wait, and a one-off straggler does not stop the refills of clients that do come back. The engine
core (`forwards_on_loop`) cannot tell them apart as well: requests that arrived during a forward
reach it only after the forward, so on its clock they came back at once; the refill they satisfy
then ends at once too, but one still short of its rows waits out the window.

Deadlines are the scheduler's: a request's future fails with DeadlineExceeded at its deadline
(a timer on the event loop), whether it is still queued or between two of its chunks, and what
it had left never reaches the model thread. A chunk already in a forward cannot be interrupted:
it finishes and its rows are discarded. The same holds for a request the caller cancelled (the
client left). So the model thread only ever works for requests that can still be answered, and
it is never busy for longer than one within-budget forward: a cache build (`run_exclusive`)
waits for at most that. A full scheduler (`max_queued` requests in flight) refuses at once (429).
If a forward fails, every request with rows in it fails with that error, once; the rest of the
queue goes on.

Where the forward runs. By default on a "model thread" beside the event loop, so the loop keeps
answering (parsing HTTP, for the single process) while torch works with the GIL released. The
engine core behind HTTP frontends instead runs a CPU forward on its event loop's own thread
(`forwards_on_loop`): its loop has only cheap socket messages to handle, and a second thread
taking the GIL between torch's calls cost the forward more than it gained; messages wait in
ZeroMQ's queue meanwhile and are taken in one go after it. For each loop forward the model thread
is parked in a job of its own (`_parked`), queued as the forward would have been: the forward
starts once the work queued before it is done (a cancelled build that still runs included), and
work queued after it waits until it ends, so the two never overlap and keep their order. A
method's first forward, which also builds its prefix (below), then holds the loop that long.

On a GPU a forward is only launched on the model thread (the engine returns a `Collect`), and the
batching task launches the next batch before it collects the last: while the device runs forward
k, the host prepares k + 1 (layout, one copy of its indices, its graph's replay queued behind k),
then waits for k's logits and the event loop answers its requests. So the device is not left idle
while the host works between batches. On the CPU the forward finishes where it ran and its rows
go out at once.

Threads that run the model. Three kinds of thread call the same model object:
- this scheduler's model thread: every classification forward (or, with `forwards_on_loop`, the
  event loop's thread) and every cache build (task start-up and admin builds, via
  `run_exclusive`), one at a time;
- a β-training thread per re-weighting job (server/tasks.py), which runs forwards and backwards
  through the model while classification goes on;
- an analysis thread per analysis job (server/analyses.py).
Both job threads run at nice 19 (server/jobs.py), so the model thread gets the CPU first.
They never mutate model state, which is why they may run concurrently: the weights are frozen
(`prepare_model` sets requires_grad False on every parameter and puts the model in eval mode, so
no dropout or running statistics change, and nothing calls an optimiser on them); a forward keeps
its instructions (attention plan, β, captures) in arguments and tensors that its caller owns, not
on the modules; β-training optimises its own β leaf tensor and the trained β is swapped into the
served task on the event loop only when training finished; analyses get their own outputs. The
other shared writes are the classifier's two memos. Its per-method prefix: the task's own method is
built on the model thread when the task is prepared, other methods on the model thread at their
first forward (that one forward then also builds the prefix, the one time the model thread works
longer than a within-budget forward); β-training uses the task's own method (already built) and
the analyses do not use it, so the other threads only read it. Its re-weighting memo (β plus label
keys for the β last passed): written by the model thread and the training thread alike, as one
dict assignment of an immutable value, checked by identity before use, so a race costs at most a
rebuild. Anchor caches are read-only once built.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from anchor_cache.errors import AnchorServeError, UnavailableError, ValidationError
from anchor_cache.task import Method
from server.metrics import Metrics

log = logging.getLogger(__name__)
FORWARD_HISTORY = 8  # forwards whose median time the refill's window follows
RETURN_HISTORY = 8  # forwards whose senders' median return time decides whether a refill pays


class Overloaded(AnchorServeError):
    """The queue is full (`max_queued`): refused at once, to be retried later."""

    kind = "overloaded"


class DeadlineExceeded(AnchorServeError):
    """The request's deadline passed before its answer."""

    kind = "timeout"


@dataclass(frozen=True)
class Work:
    """Rows of one request inside a forward, with the task object the request was admitted
    against, so a task replaced while it waited still answers with the labels it was tokenised for."""

    task: Any
    method: Method
    queries: list[list[int]]


# Called on the model thread (or the loop's, `forwards_on_loop`) with the parts of one forward
# (possibly chunks of several requests, of several tasks); returns each part's (rows, C) logits, C
# being that part's task's label count, or, when the forward was only launched on a device, a
# `Collect` that waits for them.
Collect = Callable[[], list[torch.Tensor]]
RunBatch = Callable[[list[Work]], list[torch.Tensor] | Collect]


@dataclass(frozen=True)
class Launched:
    """A batch whose forward runs on the device: collected after the next batch is launched."""

    batch: list[Chunk]
    collect: Collect
    start: float  # time.perf_counter() at launch


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int  # rows per forward
    max_batch_tokens: int  # Σ over rows of cached + re-encoded + query tokens per forward
    max_wait_s: float  # how long a request that finds the model idle waits for others to join its batch
    max_queued: int  # requests in flight (queued or running) before new ones get 429
    refill_wait_fraction: float = 0.0  # the longest refill (`Refill`), as a fraction of a forward's time


@dataclass(frozen=True)
class Refill:
    """After a forward that ran to its end, how the next batch waits for its rows' senders to return."""

    until: float  # loop time at which the next batch starts regardless
    rows: int  # it starts earlier once this many rows are queued: those queued at the forward's end, plus
    # the rows it answered


@dataclass(frozen=True)
class Answered:
    """A forward that ran to its end, watched for its senders' next requests (timed whether or not a
    refill waits for them)."""

    at: float  # loop time of its end
    rows: int  # rows of the live requests it completed
    submitted: int  # rows submitted to the scheduler before then


@dataclass(eq=False)
class Entry:
    """One request: its rows go out in chunks (`sent` so far) and come back in order (`parts`)."""

    task: Any
    method: Method
    queries: list[list[int]]
    attended_tokens: int  # per row, before its query: cached anchor tokens plus re-encoded tokens
    deadline: float  # time.monotonic()
    future: asyncio.Future
    on_start: Callable[[float], None] | None = None  # hears the seconds waited before the first forward
    enqueued: float = field(default_factory=time.perf_counter)
    sent: int = 0  # rows handed to a forward
    received: int = 0  # rows whose logits came back
    parts: list[torch.Tensor] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None

    def cost(self, start: int, stop: int) -> int:
        """Tokens the forward attends over for rows [start, stop)."""
        return sum(self.attended_tokens + len(q) for q in self.queries[start:stop])

    def expire(self, metrics: Metrics) -> None:
        if not self.future.done():
            self.future.set_exception(DeadlineExceeded(
                f"no result by the request's deadline; {len(self.queries) - self.received} of "
                f"{len(self.queries)} inputs were not classified"
            ))
            metrics.failures.labels("timeout").inc()

    def deliver(self, logits: torch.Tensor) -> None:
        if self.future.done():  # expired, cancelled or failed meanwhile: the rows are discarded
            return
        self.parts.append(logits)
        self.received += logits.shape[0]
        if self.received == len(self.queries):
            self.future.set_result(self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts))


@dataclass(frozen=True)
class Chunk:
    """Rows [start, stop) of one request, inside one forward."""

    entry: Entry
    start: int
    stop: int

    @property
    def queries(self) -> list[list[int]]:
        return self.entry.queries[self.start : self.stop]


class Scheduler:
    def __init__(self, run_batch: RunBatch, limits: BatchLimits, metrics: Metrics) -> None:
        self.run_batch = run_batch
        self.limits = limits
        self.metrics = metrics
        self.forwards_on_loop = False  # set once the model's device is known (see the module's text)
        self._queue: deque[Entry] = deque()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anchorserve-model")
        self._loop_task: asyncio.Task | None = None
        self._closing = False
        self._in_flight = 0
        self._refill: Refill | None = None
        self._forward_seconds: deque[float] = deque(maxlen=FORWARD_HISTORY)  # the refill's window: their median
        self._submitted = 0  # rows submitted so far
        self._answered: Answered | None = None  # the last forward, until as many rows as it answered are submitted
        self._returns: deque[float] = deque(maxlen=RETURN_HISTORY)  # those seconds; inf: not within a forward

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._batch_loop(), name="anchorserve-batcher")

    def submit(
        self, task: Any, method: Method, queries: list[list[int]], attended_tokens: int, deadline: float,
        on_start: Callable[[float], None] | None = None,
    ) -> asyncio.Future:
        """Queue a request; the returned future resolves to the (N, C) logits of its N queries, in order.

        `attended_tokens`: tokens each query attends over before its own: its cached anchor tokens
        plus the tokens re-encoded before it.
        `on_start`: called with the seconds the request waited in the queue when its first forward starts.
        `deadline`: a time.monotonic() instant; at it the future fails with DeadlineExceeded
        (counted as failures{reason="timeout"} here) unless it already resolved. Cancel the future
        when the client leaves: its remaining rows are skipped. Raises UnavailableError while stopping
        and Overloaded (counted as failures{reason="overloaded"}) when `max_queued` requests are
        in flight.
        """
        if self._closing:
            raise UnavailableError("the server is shutting down")
        if not queries:
            raise ValidationError("no inputs to classify")
        if self._in_flight >= self.limits.max_queued:
            self.metrics.failures.labels("overloaded").inc()
            raise Overloaded(f"{self._in_flight} requests in flight (max_queued_requests); retry later")
        loop = asyncio.get_running_loop()
        entry = Entry(task, method, queries, attended_tokens, deadline, loop.create_future(), on_start)
        entry.timer = loop.call_later(max(0.0, deadline - time.monotonic()), entry.expire, self.metrics)
        self._in_flight += 1
        self._submitted += len(queries)
        if self._answered is not None and self._submitted - self._answered.submitted >= self._answered.rows:
            self._returns.append(loop.time() - self._answered.at)
            self._answered = None
        entry.future.add_done_callback(lambda _: self._done(entry))
        self._queue.append(entry)
        self.metrics.queue_size.set(len(self._queue))
        self._wake.set()
        return entry.future

    def run_exclusive(self, fn: Callable[[], object]) -> asyncio.Future:
        """Run `fn` on the model thread between forwards (cache builds must not race a forward)."""
        return asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _done(self, entry: Entry) -> None:
        self._in_flight -= 1
        if entry.timer is not None:
            entry.timer.cancel()

    def _drop_finished(self) -> None:
        """Remove entries that are answered (cancelled, failed) or past their deadline."""
        now = time.monotonic()
        live: deque[Entry] = deque()
        for entry in self._queue:
            if not entry.future.done() and entry.deadline <= now:
                entry.expire(self.metrics)  # its timer has not run yet; it never reaches the model
            if not entry.future.done():
                live.append(entry)
        self._queue = live

    def _take_batch(self) -> list[Chunk]:
        """As many rows of the oldest live request as fit, then whole requests that fit, in arrival order."""
        self._drop_finished()
        if not self._queue:
            return []
        limits = self.limits
        first = self._queue[0]
        start = stop = first.sent
        tokens = 0
        while stop < len(first.queries):
            cost = tokens + first.cost(stop, stop + 1)
            if stop > start and (stop - start + 1 > limits.max_batch_size or cost > limits.max_batch_tokens):
                break  # the first row always goes, alone if it is over the budget by itself
            tokens, stop = cost, stop + 1
        first.sent = stop
        if stop == len(first.queries):
            self._queue.popleft()
        batch, rows = [Chunk(first, start, stop)], stop - start
        if stop < len(first.queries):
            return batch  # the rest of a split request goes next; nothing else fits beside it
        for entry in list(self._queue):
            size = rows + len(entry.queries) - entry.sent
            cost = tokens + entry.cost(entry.sent, len(entry.queries))
            if size > limits.max_batch_size or cost > limits.max_batch_tokens:
                break  # keep arrival order
            self._queue.remove(entry)
            batch.append(Chunk(entry, entry.sent, len(entry.queries)))
            entry.sent = len(entry.queries)
            rows, tokens = size, cost
        return batch

    def _queued_rows(self) -> int:
        return sum(len(e.queries) - e.sent for e in self._queue)

    def _live_rows(self) -> int:
        """Queued rows of requests that can still be answered."""
        return sum(len(e.queries) - e.sent for e in self._queue if not e.future.done())

    def _refilled(self, rows: int) -> bool:
        """Whether the queue holds `rows` live rows, a forward's worth of rows or tokens, or the rest of a
        split request (which runs alone)."""
        if self._queue and self._queue[0].sent and not self._queue[0].future.done():
            return True
        return (self._live_rows() >= min(rows, self.limits.max_batch_size)
                or sum(e.cost(e.sent, len(e.queries)) for e in self._queue if not e.future.done())
                >= self.limits.max_batch_tokens)

    async def _wait_for(self, refill: Refill) -> None:
        """Wait out `refill`, counting how it ended."""
        if self._refilled(refill.rows):
            return  # a batch was queued already: nothing was waited for
        start, refilled = time.perf_counter(), False
        while not self._closing and not refilled:
            self._wake.clear()
            try:
                async with asyncio.timeout_at(refill.until):
                    await self._wake.wait()
            except TimeoutError:  # uvloop's timers may fire before loop.time() reaches `until`: no re-check
                refilled = self._refilled(refill.rows)
                break
            refilled = self._refilled(refill.rows)
        if not self._closing:
            outcome = "returned" if refilled else "ran_out"
            self.metrics.refill_seconds.labels(outcome).observe(time.perf_counter() - start)

    async def _batch_loop(self) -> None:
        """Take a batch, launch it, then collect the batch launched before it: while the device runs
        one forward, the model thread prepares the next and the event loop answers the last.
        A forward that finishes where it ran (the CPU) is delivered at once."""
        loop = asyncio.get_running_loop()
        running: Launched | None = None
        while True:
            if self._refill is not None:
                await self._wait_for(self._refill)
                self._refill = None
            if running is None and not self._queue:
                if self._closing:
                    return
                await self._wake.wait()
                self._wake.clear()
                if self.limits.max_wait_s and self._queued_rows() < self.limits.max_batch_size:
                    await asyncio.sleep(self.limits.max_wait_s)  # let concurrent requests join the batch
            batch = self._take_batch()
            launched = await self._launch(batch, loop) if batch else None
            if running is not None:
                await self._collect(running, loop)
            running = launched
            self.metrics.queue_size.set(len(self._queue))

    async def _launch(self, batch: list[Chunk], loop: asyncio.AbstractEventLoop) -> Launched | None:
        """Run or launch one batch (on the model thread, or the loop's: `forwards_on_loop`); None when it
        is already answered (or failed)."""
        self.metrics.queue_size.set(len(self._queue))
        start = time.perf_counter()
        for chunk in batch:
            if chunk.start == 0:
                waited = start - chunk.entry.enqueued
                self.metrics.queue_seconds.observe(waited)
                if chunk.entry.on_start is not None:
                    chunk.entry.on_start(waited)
        work = [Work(chunk.entry.task, chunk.entry.method, chunk.queries) for chunk in batch]
        self.metrics.batch_size.observe(sum(len(w.queries) for w in work))
        try:
            if self.forwards_on_loop:
                async with self._parked(loop):
                    result, ran = self._timed(work)
            else:
                result, ran = await loop.run_in_executor(self._executor, self._timed, work)
        except Exception as exc:
            self.metrics.inference_seconds.observe(time.perf_counter() - start)
            self._fail(batch, exc)
            self._answered = None  # its senders' retries are not returns
            return None
        if callable(result):
            return Launched(batch, result, start)
        self.metrics.inference_seconds.observe(time.perf_counter() - start)
        self._forward_seconds.append(ran)
        if self._answered is not None:  # the last forward's senders did not come back within this one
            self._returns.append(math.inf)
        # Rows whose request is now answered: a split request's sender waits on until its last chunk.
        answered = sum(c.stop - c.start for c in batch if c.stop == len(c.entry.queries) and not c.entry.future.done())
        self._answered = Answered(loop.time(), answered, self._submitted) if answered else None
        window = self.limits.refill_wait_fraction * min(ran, statistics.median(self._forward_seconds))
        if window and (not self._returns or statistics.median(self._returns) <= window):
            self._refill = Refill(loop.time() + window, self._live_rows() + answered)
        self._deliver(batch, result)
        return None

    def _timed(self, work: list[Work]) -> tuple[list[torch.Tensor] | Collect, float]:
        """`run_batch(work)` and the seconds it took, measured where it runs: not its wait for the turn."""
        start = time.perf_counter()
        return self.run_batch(work), time.perf_counter() - start

    @contextlib.asynccontextmanager
    async def _parked(self, loop: asyncio.AbstractEventLoop) -> AsyncIterator[None]:
        """The model thread's turn, held by a job that parks it while the body runs on the loop."""
        turn: asyncio.Future[None] = loop.create_future()
        release = threading.Event()

        def park() -> None:
            loop.call_soon_threadsafe(_resolve, turn)
            release.wait()

        self._executor.submit(park)
        try:
            await turn
            yield
        finally:  # also when the wait was cancelled: the parked job must not hold the thread for good
            release.set()

    async def _collect(self, launched: Launched, loop: asyncio.AbstractEventLoop) -> None:
        try:
            logits = await loop.run_in_executor(self._executor, launched.collect)
        except Exception as exc:
            self._fail(launched.batch, exc)
            return
        finally:  # from launch to collection: forwards in flight overlap, so these may sum past the wall time
            self.metrics.inference_seconds.observe(time.perf_counter() - launched.start)
        self._deliver(launched.batch, logits)

    def _deliver(self, batch: list[Chunk], logits: list[torch.Tensor]) -> None:
        """Hand each request its rows."""
        got = [part.shape[0] for part in logits]
        want = [chunk.stop - chunk.start for chunk in batch]
        if got != want:
            self._fail(batch, RuntimeError(f"the forward returned {got} rows for {want}"))
            return
        for chunk, part in zip(batch, logits, strict=True):
            chunk.entry.deliver(part)

    @staticmethod
    def _fail(batch: list[Chunk], exc: Exception) -> None:
        """Every request with rows in a failed batch gets the error, once; the rest of the queue goes on."""
        rows = sum(c.stop - c.start for c in batch)
        if isinstance(exc, AnchorServeError):  # the caller's input: no traceback to flood the log
            log.info("forward of %d rows refused: %s", rows, exc)
        else:
            log.error("forward of %d rows failed", rows, exc_info=exc)
        for chunk in batch:
            if not chunk.entry.future.done():
                chunk.entry.future.set_exception(exc)

    async def stop(self) -> None:
        """Refuse new requests, finish queued ones (those not past their deadline), then stop the model
        thread. A build still running there (its job was cancelled) is left to end on its own, and
        work queued behind it is dropped: waiting for it would block the event loop, and the shutdown."""
        self._closing = True
        self._wake.set()
        if self._loop_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        self._executor.shutdown(wait=False, cancel_futures=True)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # its waiter may have been cancelled meanwhile
        future.set_result(None)
