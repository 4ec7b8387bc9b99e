"""The scheduler's interface, with a stand-in for the model: budgets, splitting, deadlines, failures.

The stand-in records every forward's rows and can hold a forward (keyed by the first token of its
first row) on a threading.Event, which keeps the model thread busy while a test queues work.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from anchor_cache.errors import UnavailableError
from anchor_cache.task import Method
from server.metrics import Metrics
from server.scheduler import BatchLimits, DeadlineExceeded, Overloaded, Scheduler

M = Method.HIDDEN_ANCHOR
GUARD = 10.0  # seconds: the most a test waits for an event before failing instead of hanging
BUSY = 99  # first token of the forward that holds the model thread


def row_logits(q: list) -> list[float]:
    """Logits that identify the row: (first token, length)."""
    return [float(q[0]), float(len(q))]


class Model:
    """run_batch stand-in."""

    def __init__(self) -> None:
        self.calls: list[list] = []
        self.gates: dict[int, threading.Event] = {}  # a forward starting with this token waits here
        self.entered: dict[int, threading.Event] = {}  # ... and sets this when it begins
        self.fail_on: int | None = None  # a forward with a row starting with this token raises
        self.tasks: list[list] = []  # per forward: the task of each part
        self.threads: list[int] = []  # per forward: the thread it ran on
        self.seconds: dict[int, float] = {}  # a forward starting with this token computes this long
        self.started_at: list[float] = []  # per forward: time.monotonic() when it began
        self.ended_at: list[float] = []  # ... and when it returned

    def hold(self, token: int) -> None:
        self.gates[token], self.entered[token] = threading.Event(), threading.Event()

    def release(self, token: int) -> None:
        self.gates[token].set()

    def release_all(self) -> None:
        for gate in self.gates.values():
            gate.set()

    def __call__(self, work):
        queries = [q for part in work for q in part.queries]
        self.calls.append([list(q) for q in queries])
        self.tasks.append([part.task for part in work])
        self.threads.append(threading.get_ident())
        self.started_at.append(time.monotonic())
        first = queries[0][0]
        time.sleep(self.seconds.get(first, 0.0))
        if first in self.gates:
            self.entered[first].set()
            if not self.gates[first].wait(GUARD):
                raise RuntimeError("the test never released the model thread")
        if self.fail_on is not None and any(q[0] == self.fail_on for q in queries):
            raise RuntimeError("forward failed")
        self.ended_at.append(time.monotonic())
        return [torch.tensor([row_logits(q) for q in part.queries]) for part in work]

    def firsts(self) -> list[list]:
        return [[q[0] for q in call] for call in self.calls]

    async def started(self, token: int) -> None:
        assert await asyncio.to_thread(self.entered[token].wait, GUARD), f"forward {token} never started"


def later() -> float:
    return time.monotonic() + 60.0  # a deadline no test reaches


def soon() -> float:
    return time.monotonic() + 0.05


def failures(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("anchorserve_request_failure_total", {"reason": reason}) or 0.0


def run(limits: BatchLimits, scenario, metrics: Metrics | None = None, on_loop: bool = False):
    """Run `scenario(scheduler, model)` against a started Scheduler; stop it afterwards.
    `on_loop`: the engine core's mode, forwards on the event loop's thread."""
    model, metrics = Model(), metrics or Metrics()

    async def main():
        scheduler = Scheduler(model, limits, metrics)
        scheduler.forwards_on_loop = on_loop
        scheduler.start()
        try:
            return await asyncio.wait_for(scenario(scheduler, model), GUARD)
        finally:
            model.release_all()
            await scheduler.stop()

    return asyncio.run(main())


async def occupy(scheduler: Scheduler, model: Model) -> asyncio.Future:
    """Hold the model thread in a forward of its own, so what is submitted next queues up."""
    model.hold(BUSY)
    busy = scheduler.submit("t", M, [[BUSY]], 0, later())
    await model.started(BUSY)
    return busy


@pytest.mark.parametrize(("prefix", "forwards"), [(100, [[BUSY], [1], [2]]), (0, [[BUSY], [1, 2]])])
def test_token_budget_counts_attended_tokens(prefix, forwards):
    """Two 30-token queries under a 250-token budget: with 100 prefix tokens a row costs 130, and two
    rows (260) do not fit; without a prefix they (60) share one forward."""

    async def scenario(scheduler, model):
        busy = await occupy(scheduler, model)
        a = scheduler.submit("t", M, [[1] * 30], prefix, later())
        b = scheduler.submit("t", M, [[2] * 30], prefix, later())
        model.release(BUSY)
        await asyncio.gather(busy, a, b)
        return model.firsts()

    assert run(BatchLimits(8, 250, 0.0, 10), scenario) == forwards


@pytest.mark.parametrize("on_loop", [False, True])
def test_attended_tokens_split_one_request(on_loop):
    """Three rows of prefix 100 + query 20 (120 each) under 250: two rows, then one."""

    async def scenario(scheduler, model):
        future = scheduler.submit("t", M, [[1] * 20, [2] * 20, [3] * 20], 100, later())
        return await future, model.firsts()

    logits, calls = run(BatchLimits(8, 250, 0.0, 10), scenario, on_loop=on_loop)
    assert calls == [[1, 2], [3]] and logits[:, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize("on_loop", [False, True])
def test_oversized_request_is_split_and_reassembled_in_order(on_loop):
    queries = [[i] * (1 + i % 3) for i in range(10)]

    async def scenario(scheduler, model):
        future = scheduler.submit("t", M, queries, 0, later())
        return await future, model.calls

    logits, calls = run(BatchLimits(4, 1000, 0.0, 10), scenario, on_loop=on_loop)
    assert [len(c) for c in calls] == [4, 4, 2]
    assert [q for c in calls for q in c] == queries
    assert torch.equal(logits, torch.tensor([row_logits(q) for q in queries]))


def test_one_row_over_the_budget_runs_alone():
    """A row whose prefix + query exceeds the budget cannot be split: it runs, with nothing beside it."""

    async def scenario(scheduler, model):
        busy = await occupy(scheduler, model)
        big = scheduler.submit("t", M, [[1] * 10, [2] * 10], 300, later())
        small = scheduler.submit("t", M, [[3]], 0, later())
        model.release(BUSY)
        await asyncio.gather(busy, big, small)
        return model.firsts(), big.result()[:, 0].tolist()

    assert run(BatchLimits(8, 250, 0.0, 10), scenario) == ([[BUSY], [1], [2], [3]], [1, 2])


def test_expired_entry_never_reaches_the_model():
    """Its deadline passes while the model thread is busy: DeadlineExceeded before the busy forward
    ends, and the next request is the very next forward."""
    metrics = Metrics()

    async def scenario(scheduler, model):
        busy = await occupy(scheduler, model)
        doomed = scheduler.submit("t", M, [[1]], 0, soon())
        after = scheduler.submit("t", M, [[2]], 0, later())
        with pytest.raises(DeadlineExceeded):
            await doomed
        assert not busy.done()
        model.release(BUSY)
        await asyncio.gather(busy, after)
        return model.firsts()

    assert run(BatchLimits(8, 1000, 0.0, 10), scenario, metrics) == [[BUSY], [2]]
    assert failures(metrics, "timeout") == 1


def test_expired_entry_is_dropped_when_the_batch_is_taken():
    """An entry already past its deadline when a batch is taken (its timer not run yet) is dropped there."""
    metrics = Metrics()

    async def scenario():
        scheduler = Scheduler(Model(), BatchLimits(8, 1000, 0.0, 10), metrics)  # not started: take by hand
        doomed = scheduler.submit("t", M, [[1]], 0, time.monotonic() - 1)
        live = scheduler.submit("t", M, [[2]], 0, later())
        batch = scheduler._take_batch()  # nothing awaited since the submits: the expiry timer has not run
        assert [c.entry.future for c in batch] == [live]
        assert isinstance(doomed.exception(), DeadlineExceeded)
        live.cancel()
        scheduler._executor.shutdown()

    asyncio.run(scenario())
    assert failures(metrics, "timeout") == 1


def test_deadline_between_chunks_stops_a_split_request():
    """The deadline passes during a split request's first chunk: DeadlineExceeded once, its other
    chunks never run, and the next request follows at once."""
    metrics = Metrics()

    async def scenario(scheduler, model):
        model.hold(1)
        doomed = scheduler.submit("t", M, [[1], [2], [3], [4], [5]], 0, soon())
        await model.started(1)
        after = scheduler.submit("t", M, [[6]], 0, later())
        with pytest.raises(DeadlineExceeded):
            await doomed
        model.release(1)
        await after
        return model.firsts()

    assert run(BatchLimits(2, 1000, 0.0, 10), scenario, metrics) == [[1, 2], [6]]
    assert failures(metrics, "timeout") == 1


def test_failing_chunk_fails_the_request_once_and_the_queue_goes_on():
    async def scenario(scheduler, model):
        busy = await occupy(scheduler, model)
        model.fail_on = 3
        split = scheduler.submit("t", M, [[1], [2], [3], [4], [5], [6]], 0, later())
        after = scheduler.submit("t", M, [[7]], 0, later())
        model.release(BUSY)
        await busy
        with pytest.raises(RuntimeError, match="forward failed"):
            await split
        return await after, model.firsts()

    logits, calls = run(BatchLimits(2, 1000, 0.0, 10), scenario)
    assert calls == [[BUSY], [1, 2], [3, 4], [7]]  # the failed request's last chunk [5, 6] never ran
    assert logits[:, 0].tolist() == [7]


def test_failed_forward_fails_every_request_in_it():
    async def scenario(scheduler, model):
        busy = await occupy(scheduler, model)
        model.fail_on = 1
        a = scheduler.submit("t", M, [[1]], 0, later())
        b = scheduler.submit("t", M, [[2]], 0, later())
        model.release(BUSY)
        await busy
        results = await asyncio.gather(a, b, return_exceptions=True)
        return [type(r) for r in results], model.firsts()

    assert run(BatchLimits(8, 1000, 0.0, 10), scenario) == ([RuntimeError, RuntimeError], [[BUSY], [1, 2]])


def test_cancelled_requests_are_skipped():
    """A request cancelled while queued never runs; one cancelled between chunks runs no further."""

    async def scenario(scheduler, model):
        busy = await occupy(scheduler, model)
        model.hold(2)
        gone = scheduler.submit("t", M, [[1]], 0, later())
        split = scheduler.submit("u", M, [[2], [3], [4]], 0, later())
        kept = scheduler.submit("u", M, [[5]], 0, later())
        gone.cancel()  # client left while queued
        model.release(BUSY)
        await model.started(2)  # the split request's first chunk [2, 3] is on the model thread
        split.cancel()  # client left during it
        model.release(2)
        await asyncio.gather(busy, kept)
        return model.firsts()

    assert run(BatchLimits(2, 1000, 0.0, 10), scenario) == [[BUSY], [2, 3], [5]]


def test_full_scheduler_refuses_with_overloaded():
    metrics = Metrics()

    async def scenario(scheduler, model):
        busy = await occupy(scheduler, model)
        queued = scheduler.submit("t", M, [[1]], 0, later())
        with pytest.raises(Overloaded):
            scheduler.submit("t", M, [[2]], 0, later())
        model.release(BUSY)
        await asyncio.gather(busy, queued)
        scheduler.submit("t", M, [[3]], 0, later())  # room again

    run(BatchLimits(8, 1000, 0.0, 2), scenario, metrics)
    assert failures(metrics, "overloaded") == 1


def test_run_exclusive_waits_only_for_the_running_forward():
    """A cache build queued behind a busy forward runs right after it, before requests queued later."""

    async def scenario(scheduler, model):
        busy = await occupy(scheduler, model)
        build = scheduler.run_exclusive(lambda: model.calls.append([["build"]]) or "built")
        queued = scheduler.submit("t", M, [[1]], 0, later())
        model.release(BUSY)
        assert await build == "built"
        await asyncio.gather(busy, queued)
        return model.firsts()

    assert run(BatchLimits(8, 1000, 0.0, 10), scenario) == [[BUSY], ["build"], [1]]


@pytest.mark.parametrize("on_loop", [False, True])
def test_metrics_per_forward_and_per_request(on_loop):
    metrics = Metrics()

    async def scenario(scheduler, model):
        await scheduler.submit("t", M, [[i] for i in range(5)], 0, later())

    run(BatchLimits(2, 1000, 0.0, 10), scenario, metrics, on_loop)
    sample = metrics.registry.get_sample_value
    assert sample("anchorserve_batch_size_count") == 3 and sample("anchorserve_batch_size_sum") == 5
    assert sample("anchorserve_batch_inference_seconds_count") == 3
    assert sample("anchorserve_request_queue_seconds_count") == 1
    assert sample("anchorserve_queue_size") == 0


def test_scheduler_drains_on_stop_and_then_refuses():
    """Graceful shutdown: queued work finishes, later submissions get 503 (UnavailableError)."""

    async def scenario():
        model = Model()
        scheduler = Scheduler(model, BatchLimits(4, 1000, 0.0, 10), Metrics())
        scheduler.start()
        model.hold(0)
        futures = [scheduler.submit("t", M, [[i, i]], 0, later()) for i in range(6)]
        await model.started(0)
        stopping = asyncio.ensure_future(scheduler.stop())
        await asyncio.sleep(0)  # let stop() begin
        with pytest.raises(UnavailableError):
            scheduler.submit("t", M, [[1]], 0, later())
        assert not any(f.done() for f in futures)
        model.release(0)
        await asyncio.wait_for(stopping, GUARD)
        assert all(f.done() and f.result().shape == (1, 2) for f in futures)
        assert model.firsts() == [[0, 1, 2, 3], [4, 5]]

    asyncio.run(scenario())


@pytest.mark.parametrize("on_loop", [False, True])
@pytest.mark.parametrize("refill", [0.0, 1.0])
def test_answered_senders_that_come_back_join_the_queued_rows(refill, on_loop):
    """A client that sends its next request on an answer: with a refill wait, its request and the one
    queued during the forward share the next forward; without, they alternate in two. (The first two
    rows do not fit one 1,000-token forward, so the first runs alone.)"""

    async def scenario(scheduler, model):
        model.seconds[BUSY] = 0.3  # the window: refill × this
        busy = scheduler.submit("t", M, [[BUSY] * 900], 0, later())
        queued = scheduler.submit("t", M, [[1] * 200], 0, later())
        await busy
        back = scheduler.submit("t", M, [[2]], 0, later())
        await asyncio.gather(queued, back)
        return model.firsts()

    limits, metrics = BatchLimits(8, 1000, 0.0, 10, refill_wait_fraction=refill), Metrics()
    assert run(limits, scenario, metrics, on_loop) == ([[BUSY], [1, 2]] if refill else [[BUSY], [1], [2]])
    returned = metrics.registry.get_sample_value("anchorserve_batch_refill_seconds_count", {"outcome": "returned"})
    assert returned == (1 if refill else None)


def test_a_refill_nobody_answers_lasts_its_window():
    """Rows queued during a forward whose senders do not come back wait the forward's time × the fraction."""

    metrics = Metrics()

    async def scenario(scheduler, model):
        model.seconds[BUSY] = 0.4
        busy = await occupy(scheduler, model)
        model.hold(1)
        queued = scheduler.submit("t", M, [[1]], 0, later())
        model.release(BUSY)
        await model.started(1)  # held, so that its own refill has not begun
        ran_out = metrics.registry.get_sample_value("anchorserve_batch_refill_seconds_count", {"outcome": "ran_out"})
        model.release(1)
        await asyncio.gather(busy, queued)
        return model.started_at[1] - model.ended_at[0], model.ended_at[0] - model.started_at[0], ran_out

    waited, forward, ran_out = run(BatchLimits(8, 1000, 0.0, 10, refill_wait_fraction=0.5), scenario, metrics)
    assert 0.5 * forward <= waited < GUARD / 2
    assert ran_out == 1


def refills(metrics: Metrics) -> float:
    """How many refills waited, whatever their outcome."""
    return sum(metrics.registry.get_sample_value("anchorserve_batch_refill_seconds_count", {"outcome": o}) or 0.0
               for o in ("returned", "ran_out"))


def test_traffic_on_its_own_schedule_is_not_made_to_wait():
    """Rows arriving every 10 ms, on their own clock, at 30 ms a forward: each forward leaves rows queued,
    and as many as it answered take 20 ms or more to arrive, past the 9 ms window. Only the first two
    forwards, before their senders' return times are known, may wait."""

    async def scenario(scheduler, model):
        futures = []
        for i in range(40):
            model.seconds[i] = 0.03
            futures.append(scheduler.submit("t", M, [[i]], 0, later()))
            await asyncio.sleep(0.01)
        await asyncio.gather(*futures)
        return len(model.calls)

    metrics = Metrics()
    forwards = run(BatchLimits(64, 10_000, 0.0, 100, refill_wait_fraction=0.3), scenario, metrics)
    assert forwards >= 5 and refills(metrics) <= 2


@pytest.mark.parametrize("refill", [0.0, 1.0])
def test_senders_that_come_back_share_forwards_after_a_straggler(refill):
    """Two clients that send again 5 and 10 ms after each answer (an HTTP round trip): with a refill they
    share each forward instead of alternating, and when one stays away for about two forwards, the
    refill that ran out for it does not stop the ones after."""

    async def client(scheduler, token: int, turnaround: float) -> None:
        for turn in range(10):
            await scheduler.submit("t", M, [[token]], 0, later())
            await asyncio.sleep(0.12 if (token, turn) == (2, 2) else turnaround)

    async def scenario(scheduler, model):
        model.seconds[1] = model.seconds[2] = 0.05
        await asyncio.gather(client(scheduler, 1, 0.005), client(scheduler, 2, 0.01))
        return model.firsts()

    forwards = run(BatchLimits(8, 1000, 0.0, 10, refill_wait_fraction=refill), scenario)
    alone = next(i for i, rows in enumerate(forwards) if len(rows) == 1)  # without a refill: from the second
    back = next(i for i in range(alone, len(forwards)) if 2 in forwards[i])
    assert all(sorted(rows) == [1, 2] for rows in forwards[back:back + 2]) == bool(refill), forwards


def test_a_split_request_does_not_count_as_senders_staying_away():
    """The chunks of a request split over several forwards answer no one until the last: its sender is
    not one that failed to come back, and clients that do come back share forwards right after it."""

    async def client(scheduler, token: int, turnaround: float) -> None:
        for _ in range(4):
            await scheduler.submit("t", M, [[token]], 0, later())
            await asyncio.sleep(turnaround)

    async def scenario(scheduler, model):
        model.seconds[1] = model.seconds[2] = model.seconds[7] = 0.05
        await scheduler.submit("t", M, [[7]] * 8, 0, later())  # four forwards of 2 rows
        await asyncio.gather(client(scheduler, 1, 0.005), client(scheduler, 2, 0.01))
        return model.firsts()

    forwards = run(BatchLimits(2, 1000, 0.0, 10, refill_wait_fraction=1.0), scenario)
    assert forwards[:4] == [[7, 7]] * 4 and all(sorted(rows) == [1, 2] for rows in forwards[4:]), forwards


def test_one_slow_forward_does_not_stretch_the_refill():
    """The window follows the median of recent forwards: after quick ones, a 1 s forward (a method's first,
    which builds its cache) leaves the rows queued behind it a short wait, not 1 s × the fraction."""

    async def scenario(scheduler, model):
        for i in range(3):
            await scheduler.submit("t", M, [[i]], 0, later())
        model.seconds[BUSY] = 1.0
        busy = await occupy(scheduler, model)
        queued = scheduler.submit("t", M, [[5]], 0, later())
        model.release(BUSY)
        await asyncio.gather(busy, queued)
        return model.started_at[-1] - model.ended_at[-2]

    assert run(BatchLimits(8, 1000, 0.0, 10, refill_wait_fraction=1.0), scenario) < 0.5


@pytest.mark.parametrize("case", ["the sender came back", "a full batch is queued", "a split request goes on"])
def test_a_refill_ends_as_soon_as_the_next_batch_is_whole(case):
    """The next forward starts at once, well inside a 1 s window, when every answered sender is back, when
    the queue holds max_batch_size rows, or when the rest of a split request is next (it runs alone)."""

    async def scenario(scheduler, model):
        if case == "a split request goes on":
            model.seconds[1] = 1.0
            split = scheduler.submit("t", M, [[1], [1], [2]], 0, later())
            await split
            return model.started_at[1] - model.started_at[0] - 1.0
        model.seconds[BUSY] = 1.0
        busy = await occupy(scheduler, model)
        if case == "a full batch is queued":
            rows = [scheduler.submit("t", M, [[i]], 0, later()) for i in (1, 2)]
            model.release(BUSY)
            await busy
            answered = time.monotonic()
            await asyncio.gather(*rows)
        else:
            model.release(BUSY)
            await busy
            answered = time.monotonic()
            await scheduler.submit("t", M, [[1]], 0, later())
        return model.started_at[-1] - answered

    assert run(BatchLimits(2, 1000, 0.0, 10, refill_wait_fraction=1.0), scenario) < 0.5


def test_requests_of_different_tasks_share_a_forward():
    """Many tasks with light traffic: their rows go out together, each part keeping its own task."""

    async def scenario(scheduler, model):
        busy = await occupy(scheduler, model)
        futures = [scheduler.submit(f"task-{i}", M, [[i] * 5], 10, later()) for i in range(1, 5)]
        model.release(BUSY)
        await busy
        results = await asyncio.gather(*futures)
        assert model.firsts()[1:] == [[1, 2, 3, 4]]
        assert model.tasks[1:] == [["task-1", "task-2", "task-3", "task-4"]]
        assert [r.tolist() for r in results] == [[row_logits([i] * 5)] for i in range(1, 5)]

    run(BatchLimits(8, 1000, 0.0, 100), scenario)


def test_forwards_on_the_loop_wait_for_exclusive_work_and_run_on_its_thread():
    """The engine core's mode: no forward while a cache build holds the model thread (the two
    would race on the model); what queued meanwhile goes out after it, on the loop's own thread,
    each request with its own rows."""

    async def scenario(scheduler, model):
        gate, log = threading.Event(), []

        def build():
            log.append("build")
            if not gate.wait(GUARD):
                raise RuntimeError("the test never released the build")
            log.append("built")

        building = scheduler.run_exclusive(build)
        futures = [scheduler.submit(f"task-{i}", M, [[i] * i], 0, later()) for i in (1, 2, 3)]
        for _ in range(20):  # loop turns: a forward that did not wait for the build would run in these
            await asyncio.sleep(0)
        assert model.calls == []
        gate.set()
        await building
        results = await asyncio.gather(*futures)
        assert log == ["build", "built"]
        assert model.firsts() == [[1, 2, 3]] and model.tasks == [["task-1", "task-2", "task-3"]]
        assert model.threads == [threading.get_ident()]
        assert [r.tolist() for r in results] == [[row_logits([i] * i)] for i in (1, 2, 3)]

    run(BatchLimits(8, 1000, 0.0, 10), scenario, on_loop=True)


def test_forwards_on_the_loop_keep_their_turn_among_exclusive_work():
    """The model thread's queue order holds as it does for its own forwards: a forward waits for a
    build queued before it, even one whose caller gave up on it while it ran (its thread still
    runs it), and a build queued after the forward waits for the forward."""

    async def scenario(scheduler, model):
        gate = threading.Event()

        def first_build():
            model.calls.append([["first build"]])
            if not gate.wait(GUARD):
                raise RuntimeError("the test never released the build")
            model.calls.append([["first built"]])

        building = scheduler.run_exclusive(first_build)
        answer = scheduler.submit("t", M, [[1]], 0, later())
        for _ in range(20):  # loop turns: the batch is taken and the forward queued for its turn
            await asyncio.sleep(0)
        later_build = scheduler.run_exclusive(lambda: model.calls.append([["later build"]]))
        building.cancel()  # the caller leaves; the model thread is still inside the build
        for _ in range(20):
            await asyncio.sleep(0)
        assert [1] not in model.firsts()
        gate.set()
        await asyncio.gather(answer, later_build)
        return model.firsts()

    order = run(BatchLimits(8, 1000, 0.0, 10), scenario, on_loop=True)
    assert order == [["first build"], ["first built"], [1], ["later build"]]


def test_forwards_off_the_loop_run_on_the_model_thread():
    async def scenario(scheduler, model):
        await scheduler.submit("t", M, [[1]], 0, later())
        assert model.threads != [threading.get_ident()] and len(model.threads) == 1

    run(BatchLimits(8, 1000, 0.0, 10), scenario)


class DeviceModel(Model):
    """A run_batch stand-in whose forwards are only launched, as on a GPU: it returns a collector,
    and logs when each forward is launched and collected."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[str] = []
        self.fail_collect: int | None = None  # collecting the forward whose first row starts with this fails

    def __call__(self, work):
        result = super().__call__(work)
        first = work[0].queries[0][0]
        self.log.append(f"launch {first}")

        def collect():
            self.log.append(f"collect {first}")
            if first == self.fail_collect:
                raise RuntimeError("the device failed")
            return result

        return collect


def test_a_launched_forward_is_collected_after_the_next_is_launched():
    """Pipelining: while the device runs forward k, forward k + 1 is prepared and launched, and k's
    rows are handed out after that; every request still gets its own rows, in order."""

    async def scenario():
        model = DeviceModel()
        scheduler = Scheduler(model, BatchLimits(2, 1000, 0.0, 10), Metrics())
        scheduler.start()
        try:
            model.hold(0)
            first = scheduler.submit("t", M, [[0]], 0, later())
            await model.started(0)
            rest = [scheduler.submit("t", M, [[i], [i, i]], 0, later()) for i in (1, 2)]
            model.release(0)
            results = await asyncio.gather(first, *rest)
        finally:
            model.release_all()
            await scheduler.stop()
        assert model.log == ["launch 0", "launch 1", "collect 0", "launch 2", "collect 1", "collect 2"]
        assert [r.tolist() for r in results] == [[row_logits([0])], *([row_logits([i]), row_logits([i, i])]
                                                                      for i in (1, 2))]

    asyncio.run(scenario())


@pytest.mark.parametrize("on_loop", [False, True])
def test_a_failed_collection_fails_only_its_own_requests(on_loop):
    async def scenario():
        model = DeviceModel()
        model.fail_collect = 1
        scheduler = Scheduler(model, BatchLimits(1, 1000, 0.0, 10), Metrics())
        scheduler.forwards_on_loop = on_loop
        scheduler.start()
        try:
            futures = [scheduler.submit("t", M, [[i]], 0, later()) for i in range(3)]
            done = await asyncio.gather(*futures, return_exceptions=True)
        finally:
            await scheduler.stop()
        assert isinstance(done[1], RuntimeError)
        assert [d.tolist() for i, d in enumerate(done) if i != 1] == [[row_logits([0])], [row_logits([2])]]

    asyncio.run(scenario())
