"""The StateStore interface on both backends: LocalStore on a tmp dir, RedisStore on a real
redis-server (tests/redis_server.py). Then each backend's own guarantees: damaged files,
several processes on one state dir; a hidden password, an unreachable server, a restart."""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from anchor_cache.errors import ConflictError, PreconditionFailedError, UnavailableError, ValidationError
from server.store import ABSENT, StateStore, TaskRecord
from server.store import redis as redis_backend
from server.store.local import LocalStore
from server.store.redis import RedisStore
from server.store.url import open_store
from tests.redis_server import free_port


def spec(name: str, **extra) -> dict:
    return {"name": name, "template": "Review: {text}\nSentiment:", "labels": ["no", "yes"], **extra}


@pytest.fixture(params=["local", "redis"])
def store(request, tmp_path):
    local = request.param == "local"
    s = LocalStore(tmp_path / "state") if local else RedisStore(request.getfixturevalue("redis_url"))
    yield s
    s.close()


def run_threads(n: int, target) -> list:
    """Run target(i) in n threads released together; returns their results (or exceptions)."""
    barrier, results = threading.Barrier(n), [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = target(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive()
    return results


# --- task records -----------------------------------------------------------------------------------


def test_create_then_conflict(store):
    created = store.write("sentiment", spec("sentiment"), "admin", ABSENT)
    assert created == TaskRecord("sentiment", 1, spec("sentiment"), "admin", None)
    with pytest.raises(ConflictError, match="task 'sentiment' exists"):
        store.write("sentiment", spec("sentiment", other=1), "admin", ABSENT)
    assert store.record("sentiment") == created
    assert store.records() == {"sentiment": created}
    assert store.record("never-written") is None


def test_conditional_writes(store):
    first = store.write("t", spec("t"), "admin", ABSENT)
    with pytest.raises(PreconditionFailedError, match=f"task 't' is at revision {first.revision}, not 0"):
        store.write("t", spec("t", v=2), "admin", 0)
    with pytest.raises(PreconditionFailedError, match=f"at revision {first.revision}, not {first.revision + 7}"):
        store.write("t", spec("t", v=2), "admin", first.revision + 7)
    second = store.write("t", spec("t", v=2), "config", first.revision)
    assert second.revision > first.revision
    assert store.record("t") == TaskRecord("t", second.revision, spec("t", v=2), "config")
    with pytest.raises(PreconditionFailedError, match=f"at revision {second.revision}, not {first.revision}"):
        store.write("t", spec("t", v=3), "admin", first.revision)
    assert store.record("t").spec == spec("t", v=2)  # the refused writes changed nothing
    # expect 0: "never written"
    assert store.write("fresh", spec("fresh"), "admin", 0).revision > second.revision


def test_unconditional_writes_and_argument_checks(store):
    a = store.write("u", spec("u"), "config", None)
    b = store.write("u", spec("u", v=2), "admin", None)
    assert b.revision > a.revision and store.record("u") == b
    with pytest.raises(ValidationError):
        store.write("../etc", spec("../etc"), "admin", None)
    with pytest.raises(ValidationError, match="names task 'other'"):
        store.write("u", spec("other"), "admin", None)
    with pytest.raises(ValidationError):
        store.write("u", spec("u"), "nobody", None)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        store.write("u", spec("u"), "admin", -5)
    assert store.record("u") == b
    assert store.record("../etc") is None


def test_tombstones(store):
    created = store.write("gone", spec("gone"), "admin", ABSENT)
    deleted = store.write("gone", None, "admin", created.revision)
    assert deleted.revision > created.revision and deleted.spec is None and not deleted.live
    assert store.record("gone") == deleted
    assert store.records()["gone"] == deleted  # tombstones are listed
    recreated = store.write("gone", spec("gone", v=2), "admin", ABSENT)  # a create after a delete works
    assert recreated.revision > deleted.revision and recreated.live
    assert TaskRecord("x", 3, None, "admin", error="damaged").live


def test_revisions_grow_across_names(store):
    start = store.changes()
    revisions = [store.write(name, spec(name), "admin", None).revision for name in ("a", "b", "a", "c", "b")]
    assert revisions == sorted(set(revisions)) and len(revisions) == 5
    assert revisions[0] > start
    assert store.changes() == revisions[-1]
    assert {name: r.revision for name, r in store.records().items()} == {"a": revisions[2], "c": revisions[3],
                                                                          "b": revisions[4]}


# --- change notification ----------------------------------------------------------------------------


def blocked_waiters(store: StateStore, monkeypatch: pytest.MonkeyPatch) -> Callable[[int, int], None]:
    """`until(seen, n)` returns once n threads have entered the backend's wait for a change past
    `seen`, that is, read the counter and found nothing new: a write after that tests how they are
    woken, not their first read. Fails the test after 10 s."""
    entered = threading.Condition()
    waiting: dict[int, set[int]] = {}  # seen -> the threads that entered the wait
    await_change = store._await_change

    def recorded(seen: int, timeout: float) -> None:
        with entered:
            waiting.setdefault(seen, set()).add(threading.get_ident())
            entered.notify_all()
        await_change(seen, timeout)

    monkeypatch.setattr(store, "_await_change", recorded)

    def until(seen: int, n: int) -> None:
        with entered:
            assert entered.wait_for(lambda: len(waiting.get(seen, ())) >= n, 10), f"{n} waiters never blocked"

    return until


def test_wait_for_change_times_out_when_nothing_changes(store):
    seen = store.changes()
    began = time.monotonic()
    assert store.wait_for_change(seen, 0.4) == seen
    assert 0.35 <= time.monotonic() - began < 2.0


@pytest.mark.parametrize("waiters", [1, 3])
def test_wait_for_change_wakes_promptly_on_a_write(store, waiters, monkeypatch):
    until_blocked = blocked_waiters(store, monkeypatch)

    def wait(seen: int, woke: list) -> None:
        woke.append((store.wait_for_change(seen, 20.0), time.monotonic()))

    for round_ in range(3):
        seen = store.changes()
        woke: list[tuple[int, float]] = []
        threads = [threading.Thread(target=wait, args=(seen, woke)) for _ in range(waiters)]
        for t in threads:
            t.start()
        until_blocked(seen, waiters)
        written_at = time.monotonic()
        written = store.write("w", spec("w", round=round_), "admin", None)
        for t in threads:
            t.join(timeout=20)
            assert not t.is_alive()
        assert [value for value, _ in woke] == [written.revision] * waiters
        latest = max(at for _, at in woke) - written_at
        assert latest < 0.5, f"woke {latest:.2f}s after the write (round {round_})"
    if isinstance(store, RedisStore):  # woken by pub/sub, not by polling the counter
        assert store._pubsub is not None and not store._pubsub_broken


def test_cancel_requests_bump_changes_and_wake_waiters(store, monkeypatch):
    until_blocked = blocked_waiters(store, monkeypatch)
    seen = store.changes()
    done = threading.Event()
    result = []

    def wait() -> None:
        result.append(store.wait_for_change(seen, 20.0))
        done.set()

    threading.Thread(target=wait, daemon=True).start()
    until_blocked(seen, 1)
    store.request_cancel("job-1")
    assert done.wait(5.0)
    assert result[0] > seen and store.changes() == result[0]
    assert store.cancel_requested(["job-1", "job-2"]) == {"job-1"}
    assert store.cancel_requested([]) == set()
    with pytest.raises(ValidationError):
        store.cancel_requested(["../job"])


# --- blobs ------------------------------------------------------------------------------------------


def age_blob(store, name: str, seconds: float) -> None:
    """Pretend `name` was last used `seconds` ago."""
    then = time.time() - seconds
    if isinstance(store, LocalStore):
        os.utime(store.blob_dir / name, (then, then))
    else:
        store._redis.zadd(store._used_key, {name: then})


def test_blobs_round_trip_and_ages(store):
    name, beta = "ab12.safetensors", "ab12.beta.safetensors"
    assert store.get_blob(name) is None
    store.put_blob(name, b"\x00cache" * 100)
    store.put_blob(beta, b"beta")
    store.put_blob(name, b"\x00new")  # replaced whole
    assert store.get_blob(name) == b"\x00new" and store.get_blob(beta) == b"beta"
    ages = store.blob_ages()
    assert set(ages) == {name, beta} and all(age < 5 for age in ages.values())
    age_blob(store, name, 500)
    assert 495 < store.blob_ages()[name] < 510
    assert store.get_blob(name) == b"\x00new"  # a read marks it used
    assert store.blob_ages()[name] < 5
    for bad in ("../x", ".hidden", "a/b", "", "x\n"):
        with pytest.raises(ValidationError):
            store.put_blob(bad, b"x")
        with pytest.raises(ValidationError):
            store.get_blob(bad)


def test_blob_quarantine_and_delete(store):
    store.put_blob("k1.safetensors", b"damaged bytes")
    store.put_blob("k2.safetensors", b"0123456789")
    moved = store.quarantine_blob("k1.safetensors")
    assert store.get_blob("k1.safetensors") is None
    assert set(store.blob_ages()) == {"k2.safetensors"}
    if isinstance(store, LocalStore):
        assert moved.startswith("quarantine/k1.safetensors.")
        assert (store.state_dir / moved).read_bytes() == b"damaged bytes"
    else:
        assert moved.startswith("anchorserve:quarantine:k1.safetensors.")
        assert store._redis.get(moved) == b"damaged bytes"
    assert "already gone" in store.quarantine_blob("k1.safetensors")
    assert store.delete_blob("k2.safetensors") == 10
    assert store.delete_blob("k2.safetensors") == 0
    assert store.get_blob("k2.safetensors") is None and store.blob_ages() == {}


# --- jobs -------------------------------------------------------------------------------------------


def test_jobs_plots_round_trip(store):
    record = {"id": "job-1", "status": "running", "progress": {"done": 1.0, "total": 3.0}}
    assert store.get_job("job-1") is None
    store.put_job("job-1", record, 60)
    assert store.get_job("job-1") == record
    store.put_job("job-1", record | {"status": "done"}, 60)
    assert store.get_job("job-1")["status"] == "done"
    store.put_plot("job-1", "curve", b"\x89PNG...", 60)
    assert store.get_plot("job-1", "curve") == b"\x89PNG..."
    assert store.get_plot("job-1", "other") is None and store.get_plot("job-2", "curve") is None
    for bad_id in ("../x", "a.b", "", "x" * 65):
        with pytest.raises(ValidationError):
            store.get_job(bad_id)
    with pytest.raises(ValidationError):
        store.put_plot("job-1", "../../x", b"", 60)
    with pytest.raises(ValidationError):
        store.get_plot("job-1", "a.b")
    if isinstance(store, RedisStore):  # the records carry a TTL in Redis itself
        assert 0 < store._redis.pttl("anchorserve:job:job-1") <= 60_000
        assert 0 < store._redis.pttl("anchorserve:plot:job-1:curve") <= 60_000


def test_jobs_and_plots_expire(store):
    store.put_job("short", {"n": 1}, 0.3)
    store.put_plot("short", "p", b"png", 0.3)
    store.put_job("long", {"n": 2}, 60)
    assert store.get_job("short") == {"n": 1} and store.get_plot("short", "p") == b"png"
    began, deadline = time.monotonic(), time.monotonic() + 5
    while store.get_job("short") is not None or store.get_plot("short", "p") is not None:
        assert time.monotonic() < deadline, "the job never expired"
        time.sleep(0.02)
    assert time.monotonic() - began > 0.15
    assert store.get_job("long") == {"n": 2}
    store.put_job("other", {"n": 3}, 0)  # already expired: never readable
    assert store.get_job("other") is None
    if isinstance(store, LocalStore):  # expired files go at the next put_job
        store.put_job("sweeper", {}, 60)
        assert sorted(p.name for p in store.jobs_dir.iterdir()) == ["long.json", "sweeper.json"]


# --- concurrency ------------------------------------------------------------------------------------


def test_threads_racing_a_create(store):
    results = run_threads(8, lambda i: store.write("race", spec("race", writer=i), "admin", ABSENT))
    won = [r for r in results if isinstance(r, TaskRecord)]
    assert len(won) == 1, results
    assert all(isinstance(r, ConflictError) for r in results if r is not won[0])
    assert store.record("race") == won[0]


def test_threads_racing_unconditional_and_conditional_writes(store):
    base = store.write("cas", spec("cas"), "admin", ABSENT)

    def work(i: int) -> list[int]:
        revisions = [store.write(f"n{i % 3}", spec(f"n{i % 3}"), "admin", None).revision for _ in range(4)]
        with contextlib.suppress(PreconditionFailedError):
            revisions.append(store.write("cas", spec("cas", by=i), "admin", base.revision).revision)
        return revisions

    results = run_threads(8, work)
    revisions = [r for rs in results for r in rs]
    assert len(revisions) == 8 * 4 + 1  # exactly one compare-and-set won
    assert len(set(revisions)) == len(revisions) and min(revisions) > base.revision
    assert store.changes() == max(revisions)


def _race_worker(state_dir: str, barrier, queue, worker: int) -> None:
    """In a spawned process: race creates and unconditional writes on a shared state dir."""
    store = LocalStore(Path(state_dir))
    outcomes = []
    barrier.wait()
    for i in range(6):
        try:
            outcomes.append(("create", f"race-{i}", store.write(f"race-{i}", spec(f"race-{i}"), "admin",
                                                                ABSENT).revision))
        except ConflictError:
            outcomes.append(("conflict", f"race-{i}", None))
        outcomes.append(("put", "shared", store.write("shared", spec("shared", by=worker), "config", None).revision))
    queue.put(outcomes)


def test_local_store_processes_racing(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    n = 3
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(str(tmp_path), barrier, queue, w)) for w in range(n)]
    for p in procs:
        p.start()
    try:
        outcomes = [o for _ in range(n) for o in queue.get(timeout=60)]
    finally:
        for p in procs:
            p.join(timeout=30)
    assert all(p.exitcode == 0 for p in procs)
    for i in range(6):
        kinds = sorted(kind for kind, name, _ in outcomes if name == f"race-{i}")
        assert kinds == ["conflict"] * (n - 1) + ["create"], (i, kinds)
    revisions = [rev for kind, _, rev in outcomes if rev is not None]
    assert len(revisions) == 6 + 6 * n and len(set(revisions)) == len(revisions)
    store = LocalStore(tmp_path)
    assert store.changes() == max(revisions) == len(revisions)
    assert store.record("shared").revision == max(rev for kind, _, rev in outcomes if kind == "put")


# --- LocalStore specifics ---------------------------------------------------------------------------


DAMAGED = {
    "bad": (b"{not json", "JSONDecodeError"),
    "binary": (b"\xff\xfe\x00garbage", "UnicodeDecodeError"),
    "array": (b"[1, 2]", "not a JSON object"),
    "wrong": (json.dumps({"revision": 3, "source": "admin", "spec": spec("someone-else")}).encode(),
              "names task 'someone-else'"),
    "badrev": (json.dumps({"revision": "7", "source": "admin", "spec": None}).encode(), "revision '7'"),
}


def test_local_store_damaged_records(tmp_path):
    store = LocalStore(tmp_path)
    store.write("fine", spec("fine"), "admin", ABSENT)
    for name, (data, _) in DAMAGED.items():
        (store.tasks_dir / f"{name}.json").write_bytes(data)
    records = store.records()
    assert records["fine"].error is None
    revisions = set()
    for name, (data, reason) in DAMAGED.items():
        record = records[name]
        assert record.spec is None and record.live and record.source == "admin"
        assert record.error.startswith(f"tasks/{name}.json was damaged (") and reason in record.error
        assert "\n" not in record.error and str(tmp_path) not in record.error
        moved = record.error.rsplit("; moved to ", 1)[1]
        assert moved.startswith(f"quarantine/{name}.json.")
        assert (tmp_path / moved).read_bytes() == data
        revisions.add(record.revision)
    assert len(revisions) == len(DAMAGED) and min(revisions) > records["fine"].revision
    # repaired once: a second store (another process) reads the same records
    assert LocalStore(tmp_path).records() == records
    assert len(list((tmp_path / "quarantine").iterdir())) == len(DAMAGED)
    with pytest.raises(ConflictError, match="damaged record"):
        store.write("bad", spec("bad"), "admin", ABSENT)
    fixed = store.write("bad", spec("bad"), "admin", records["bad"].revision)
    assert fixed.error is None and store.record("bad") == fixed


def test_local_store_write_over_a_damaged_file(tmp_path):
    store = LocalStore(tmp_path)
    (store.tasks_dir / "t.json").write_bytes(b"\x00\x01")
    with pytest.raises(ConflictError):  # a damaged record is live
        store.write("t", spec("t"), "admin", ABSENT)
    assert store.record("t").error is not None
    written = store.write("t", spec("t"), "admin", None)
    assert store.record("t") == written and written.error is None
    assert len(list((tmp_path / "quarantine").iterdir())) == 1


def test_open_store_picks_the_backend(tmp_path):
    assert isinstance(open_store(None, tmp_path), LocalStore)
    assert isinstance(open_store("local", tmp_path), LocalStore)
    redis_store = open_store("redis://127.0.0.1:1/0", tmp_path)
    assert isinstance(redis_store, RedisStore)
    redis_store.close()
    with pytest.raises(ValueError):
        open_store("http://x", tmp_path)


# --- RedisStore specifics ---------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:s3cret@db.example:6379/0", "redis://:***@db.example:6379/0"),
    ("redis://app:s3cret@db.example:6379/2", "redis://app:***@db.example:6379/2"),
    ("rediss://s3cret@db.example", "rediss://***@db.example"),
    ("unix:///run/redis.sock?db=1&password=s3cret", "unix:///run/redis.sock?db=1&password=***"),
    ("redis://db.example:6379/0", "redis://db.example:6379/0"),
])
def test_redis_store_names_itself_without_the_password(url, shown):
    store = RedisStore(url)
    assert store.url == shown
    store.close()


def test_redis_unreachable_is_quick_and_named():
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    store = RedisStore(url)
    for call in (store.changes, store.records, lambda: store.write("a", spec("a"), "admin", ABSENT),
                 lambda: store.get_blob("x.safetensors"), lambda: store.wait_for_change(0, 5)):
        began = time.monotonic()
        with pytest.raises(UnavailableError) as caught:
            call()
        assert time.monotonic() - began < 3
        message = str(caught.value)
        assert f"redis://:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in message and "unreachable" in message
        assert "s3cret" not in message and "\n" not in message
        assert caught.value.__cause__ is None and caught.value.__suppress_context__
    store.close()


def test_redis_damaged_record(redis_url):
    store = RedisStore(redis_url)
    store._redis.hset("anchorserve:tasks", "bad", b"{oops")
    record = store.records()["bad"]
    assert record.spec is None and record.live and record.revision == 1
    assert "was damaged (JSONDecodeError" in record.error
    assert "moved to anchorserve:quarantine:tasks:bad." in record.error
    moved = record.error.rsplit("moved to ", 1)[1]
    assert store._redis.get(moved) == b"{oops"
    assert store.record("bad") == record  # repaired once
    with pytest.raises(ConflictError, match="damaged record"):
        store.write("bad", spec("bad"), "admin", ABSENT)
    assert store.write("bad", spec("bad"), "admin", record.revision).error is None
    store.close()


# A Redis waiter's own timeout, and the bound that fails a test whose waiter was not woken: with
# no listen slice ending in between (no_slice_ends), only the wake-up under test returns it sooner.
WAIT_S = 60.0
FAIL_S = 10.0


def no_slice_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """A waiter re-reads the counter when each listen slice (1 s) ends, so a missed wake-up only
    costs it latency; with the slice as long as its wait, a missed wake-up leaves it blocked."""
    monkeypatch.setattr(redis_backend, "LISTEN_SLICE_S", WAIT_S)


def test_redis_wait_for_change_falls_back_to_polling(redis_url, monkeypatch, caplog):
    store, other = RedisStore(redis_url), RedisStore(redis_url)

    def broken(*args, **kwargs):
        raise OSError("pub/sub is switched off here")

    monkeypatch.setattr(store._redis, "pubsub", broken)
    seen = store.changes()
    with caplog.at_level(logging.WARNING, logger="server.store.redis"):
        assert store.wait_for_change(seen, 0.3) == seen  # tries to subscribe, fails, polls
    no_slice_ends(monkeypatch)
    until_blocked = blocked_waiters(store, monkeypatch)
    done = threading.Event()
    result = []

    def wait() -> None:
        result.append(store.wait_for_change(seen, WAIT_S))
        done.set()

    threading.Thread(target=wait, daemon=True).start()
    until_blocked(seen, 1)
    written = other.write("p", spec("p"), "admin", None)
    assert done.wait(FAIL_S), "the polling waiter never saw the write"
    assert result == [written.revision] and store._pubsub_broken
    assert any("change notifications failed (OSError: pub/sub is switched off here)" in r.message
               for r in caplog.records)
    store.close()
    other.close()


def test_redis_store_survives_a_restart(redis_process, monkeypatch):
    server = redis_process(persistent=True)
    store, other = RedisStore(server.url), RedisStore(server.url)
    created = store.write("keep", spec("keep"), "admin", ABSENT)
    assert store.wait_for_change(created.revision, 0.2) == created.revision  # subscribes to events
    server.stop()
    with pytest.raises(UnavailableError, match=f"the state store {server.url} is unreachable"):
        store.changes()
    with pytest.raises(UnavailableError):
        store.wait_for_change(created.revision, 1)
    server.start()
    assert store.record("keep") == created  # the same store object reconnects; the data persisted
    second = store.write("keep", spec("keep", v=2), "admin", created.revision)
    assert second.revision > created.revision

    def subscribers() -> int:
        return other._redis.pubsub_numsub(store._channel)[0][1]

    assert subscribers() == 0  # the subscription ended with the server
    no_slice_ends(monkeypatch)
    woke = threading.Event()
    result = []

    def wait() -> None:
        result.append(store.wait_for_change(second.revision, WAIT_S))
        woke.set()

    threading.Thread(target=wait, daemon=True).start()
    deadline = time.monotonic() + FAIL_S
    while subscribers() == 0:  # a write now would be seen by the waiter's read, not by a notification
        assert time.monotonic() < deadline, "the waiter never subscribed again"
        time.sleep(0.01)
    third = other.write("keep", None, "admin", second.revision)
    assert woke.wait(FAIL_S), "the write's notification never woke the waiter"
    assert result == [third.revision]
    store.close()
    other.close()
