"""One engine core behind two HTTP frontends (`api_servers: 2`), as real processes: answers equal
the single-process server's, admin writes reach every frontend, and the faults the split must
survive (a killed core or frontend, SIGTERM with requests in flight, bad messages on the engine
socket)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec
import pytest
import zmq
import zmq.asyncio

from server import frontend, wire
from server.serving import join, reserve
from server.settings import Settings
from server.state import ServerState
from tests.conftest import QUERIES, sentiment_task
from tests.conftest import settings as tiny_settings
from tests.test_uvicorn import free_port, save_tiny_model

ADMIN = {"Authorization": "Bearer admin-key"}


@dataclass
class Split:
    url: str
    process: subprocess.Popen
    log: Path

    def pids(self, role: str) -> list[int]:
        """Live children of the supervisor in `role` (core or frontend)."""
        out = subprocess.run(["pgrep", "-P", str(self.process.pid), "-f", f"server.supervisor {role}"],
                             capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def engine_address(self) -> str:
        found = re.findall(r"listening for frontends on (ipc://\S+)", self.log.read_text())
        assert found, "the core never opened its socket"
        return found[-1]


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


async def until(condition, timeout: float = 30) -> None:
    """Yield to the event loop until `condition()` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def ready(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/ready", timeout=2).status_code == 200
    return False


@contextlib.contextmanager
def split_server(root: Path, **settings) -> Iterator[Split]:
    model = save_tiny_model("gpt2", root / "model")
    config = root / "config.yaml"
    config.write_text(json.dumps({
        "model": str(model), "device": "cpu", "dtype": "float32", "state_dir": str(root / "state"),
        "tasks": [sentiment_task().model_dump(mode="json")], "api_servers": 2, "admin_api_key": "admin-key",
    } | settings))
    port = free_port()
    env = os.environ | {"ANCHORSERVE_CONFIG": str(config), "PORT": str(port)}
    log = root / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "server"], env=env, stdout=out, stderr=subprocess.STDOUT)
    split = Split(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_until(lambda: ready(split.url) or process.poll() is not None, 120, "the split server")
        assert process.poll() is None, log.read_text()[-3000:]
        # Each GET is a new connection, which the kernel gives to either frontend, and a frontend's
        # /ready waits for its own engine connection: ten in a row means both are ready.
        wait_until(lambda: all(ready(split.url) for _ in range(10)), 60, "both frontends ready")
        yield split
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Iterator[Split]:
    with split_server(tmp_path_factory.mktemp("split")) as server:
        yield server


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same config served in one process (in-process app), the reference."""
    from fastapi.testclient import TestClient

    from server.app import build_app
    from server.settings import Settings
    from tests.conftest import wait_ready

    root = tmp_path_factory.mktemp("single")
    model = save_tiny_model("gpt2", root / "model")
    settings = Settings(model=str(model), device="cpu", dtype="float32", state_dir=root / "state",
                        tasks=[sentiment_task()])
    with TestClient(build_app(settings)) as client:
        wait_ready(client)
        yield client


def test_answers_equal_the_single_process_server(split, single):
    body = {"input": QUERIES}
    got = httpx.post(f"{split.url}/v1/classify", json=body, timeout=30)
    want = single.post("/v1/classify", json=body)
    assert got.status_code == want.status_code == 200
    for g, w in zip(got.json()["data"], want.json()["data"], strict=True):
        assert g["label"] == w["label"] and g["probs"] == pytest.approx(w["probs"], abs=1e-6)
    assert got.json()["usage"] == want.json()["usage"]
    assert {"x-inference-time", "x-request-id"} <= set(got.headers)
    batch = {"inputs": [[q] for q in QUERIES], "raw_scores": True}
    got, want = httpx.post(f"{split.url}/predict", json=batch).json(), single.post("/predict", json=batch).json()
    for g, w in zip(got, want, strict=True):
        assert [s["label"] for s in g] == [s["label"] for s in w]
        assert [s["score"] for s in g] == pytest.approx([s["score"] for s in w], abs=1e-5)


def classified(metrics: str) -> float:
    """anchorserve_requests_total of 200s on /v1/classify, over every process."""
    found = re.search(r'anchorserve_requests_total\{route="/v1/classify",status="200",task="sentiment"\} (\S+)',
                      metrics)
    return float(found.group(1)) if found else 0.0


def test_metrics_sum_every_process(split):
    before = httpx.get(f"{split.url}/metrics").text
    for i in range(5):  # new connections: both frontends answer
        assert httpx.post(f"{split.url}/v1/classify", json={"input": f"count {i}"}).status_code == 200
    after = httpx.get(f"{split.url}/metrics").text
    assert classified(after) - classified(before) == 5
    assert "anchorserve_batch_size_count" in after and "anchorserve_request_tokenize_seconds_count" in after


def test_errors_keep_the_envelope(split, single):
    cases = [("/v1/classify", {"input": "x", "task": "nope"}, 404, "not_found"),
             ("/v1/classify", {"input": []}, 400, "empty_input"), ("/v1/classify", {"inputs": "x"}, 400, "validation"),
             ("/predict", {"inputs": ""}, 400, "empty_input"),
             ("/predict", {"inputs": "x", "no": 1}, 422, "validation"),
             ("/predict", {"inputs": "word " * 2000}, 413, "input_limit")]
    for path, body, status, kind in cases:
        got = httpx.post(f"{split.url}{path}", json=body)
        assert (got.status_code, got.json()["type"]) == (status, kind)
        assert got.json() == single.post(path, json=body).json()
    bad = httpx.post(f"{split.url}/v1/classify", content=b'{"input": ', headers={"content-type": "application/json"})
    assert (bad.status_code, bad.json()["type"]) == (400, "malformed_json")
    text = httpx.post(f"{split.url}/v1/classify", content=b"x", headers={"content-type": "text/plain"})
    assert (text.status_code, text.json()["type"]) == (415, "unsupported_media_type")


def test_a_replaced_task_is_served_by_every_frontend(split):
    spec = sentiment_task(name="swap").model_dump(mode="json")
    assert httpx.post(f"{split.url}/admin/tasks", json=spec, headers=ADMIN, timeout=60).status_code == 201

    async def label_orders() -> set[tuple[str, ...]]:
        async with httpx.AsyncClient(base_url=split.url, timeout=30) as client:
            answers = await asyncio.gather(*(client.post("/v1/classify", json={"task": "swap", "input": f"t {i}"})
                                             for i in range(16)))  # new connections: both frontends answer
        return {tuple(r.json()["data"][0]["label_probs"]) for r in answers}

    assert asyncio.run(label_orders()) == {("Negative", "Positive")}
    spec["labels"] = ["Positive", "Negative"]
    replaced = httpx.put(f"{split.url}/admin/tasks/swap", json=spec, headers=ADMIN, timeout=60)
    assert replaced.status_code == 201, replaced.text
    assert asyncio.run(label_orders()) == {("Positive", "Negative")}


def test_bad_messages_on_the_engine_socket_are_refused(split):
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(split.engine_address())
    try:
        sock.send(b"\xc1 not msgpack")
        sock.send(wire.encoder.encode({"type": "hello", "id": 1}))  # a message, not a frame's list of them
        sock.send(wire.encoder.encode([{"type": "classify", "id": 1}]))  # a known tag, fields missing
        sock.send(wire.encoder.encode([b"\xc1"]))  # a frame of one undecodable message
        sock.send(b"\x00" * (wire.MAX_MESSAGE_BYTES + 1))  # ZeroMQ drops the sender; it reconnects
        task = httpx.get(f"{split.url}/v1/tasks/sentiment").json()
        out_of_range = wire.Classify(id=7, task="sentiment", revision=task["revision"], method="hidden_anchor",
                                     queries=[[10**9]], timeout_s=5)
        deadline = time.monotonic() + 10
        reply = None
        while reply is None and time.monotonic() < deadline:  # resend until the reconnected socket answers
            # A bad message refuses only itself: the good one after it in the frame is answered.
            sock.send(wire.encoder.encode([{"type": "classify", "id": 1}, out_of_range]))
            with contextlib.suppress(zmq.Again):
                sock.setsockopt(zmq.RCVTIMEO, 500)
                reply = wire.reply_decoder.decode(sock.recv())[0]
        assert isinstance(reply, wire.Failed) and (reply.id, reply.kind) == (7, "validation")
    finally:
        sock.close()
        context.term()
    assert httpx.post(f"{split.url}/v1/classify", json={"input": "still here"}).status_code == 200
    assert "refused a message on the engine socket" in split.log.read_text()
    with pytest.raises(msgspec.ValidationError):
        wire.request_decoder.decode(wire.encoder.encode({"type": "classify", "id": 1}))


def test_a_killed_frontend_leaves_the_other_serving(split):
    """New connections go to the other frontend while one restarts, and to the restarted one only
    once it can answer: every request on a new connection, from the kill until the new frontend
    has described the model and 20 more requests, answers 200."""
    connected = "connected to the engine core serving"
    before = split.log.read_text().count(connected)
    first, second = split.pids("frontend")
    os.kill(first, signal.SIGKILL)
    statuses, after = [], 0
    while after < 20:
        statuses.append(httpx.post(f"{split.url}/v1/classify", json={"input": "text"}, timeout=10).status_code)
        if split.log.read_text().count(connected) > before:
            after += 1
        assert len(statuses) < 5000, "the frontend never came back"
    assert set(statuses) == {200}, [s for s in statuses if s != 200][:5]
    assert len(split.pids("frontend")) == 2 and second in split.pids("frontend")


def test_a_killed_core_gives_503_at_once_then_recovers(split):
    async def load(stop: asyncio.Event) -> list[tuple[int, float]]:
        results = []
        async with httpx.AsyncClient(base_url=split.url, timeout=30) as client:
            async def worker() -> None:
                while not stop.is_set():
                    start = time.monotonic()
                    r = await client.post("/v1/classify", json={"input": "under load"})
                    results.append((r.status_code, time.monotonic() - start))
            workers = [asyncio.create_task(worker()) for _ in range(8)]
            try:
                await until(lambda: len(results) >= 20)
                (core,) = split.pids("core")
                os.kill(core, signal.SIGKILL)
                await until(lambda: sum(status == 503 for status, _ in results) >= 20)
            finally:
                stop.set()
                await asyncio.gather(*workers)
        return results

    results = asyncio.run(load(asyncio.Event()))
    statuses = {status for status, _ in results}
    assert statuses <= {200, 503} and 503 in statuses and 200 in statuses
    assert max(seconds for status, seconds in results if status == 503) < 1.0  # no hang
    wait_until(lambda: all(ready(split.url) for _ in range(6)), 120, "/ready from both frontends after the restart")
    answers = [httpx.post(f"{split.url}/v1/classify", json={"input": "back"}, timeout=30) for _ in range(6)]
    assert [a.status_code for a in answers] == [200] * 6
    assert "engine core exited (signal 9); restarting" in split.log.read_text()


def test_sigterm_drains_requests_in_flight(tmp_path):
    with split_server(tmp_path, max_wait_ms=4000) as server:
        async def in_flight() -> list[int]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                sent = [asyncio.create_task(client.post("/v1/classify", json={"input": f"wait {i}"}))
                        for i in range(4)]

                async def queued() -> bool:  # all four wait in the core's 4 s batch window
                    metrics = (await client.get("/metrics")).text
                    return "anchorserve_queue_size 4.0" in metrics

                deadline = time.monotonic() + 30
                while not await queued():
                    assert time.monotonic() < deadline, "the four requests never waited in the core together"
                    await asyncio.sleep(0.01)
                server.process.send_signal(signal.SIGTERM)
                return [r.status_code for r in await asyncio.gather(*sent)]

        assert asyncio.run(in_flight()) == [200] * 4
        assert server.process.wait(timeout=60) == 0


def _accepted(sock: socket.socket) -> int:
    """Connections waiting in a listening socket's queue (accepted and closed here)."""
    sock.setblocking(False)
    count = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            sock.accept()[0].close()
            count += 1
    return count


def test_the_kernel_spreads_new_connections_over_the_frontends_sockets():
    """Each frontend listens on its own socket of the public address's group: a burst of new
    connections reaches both (one shared socket left them all to whichever accepted first). The
    reservation itself takes none, a second server cannot take the port, and a closed frontend
    socket leaves the group."""
    settings = Settings(tasks=[sentiment_task()], host="127.0.0.1", port=free_port())
    reserved = reserve(settings)
    address = reserved.getsockname()
    with pytest.raises(ConnectionRefusedError):  # bound, never listening: no connection waits there
        socket.create_connection(address, timeout=5).close()
    first, second = join(reserved), join(reserved)
    with pytest.raises(OSError):  # a second server on the port fails as for one process
        reserve(settings)
    clients = [socket.create_connection(address, timeout=5) for _ in range(64)]
    counts = _accepted(first), _accepted(second)
    assert sum(counts) == 64 and min(counts) > 0, counts
    first.close()
    late = [socket.create_connection(address, timeout=5) for _ in range(8)]
    assert _accepted(second) == 8
    for sock in [*clients, *late, second, reserved]:
        sock.close()


def requests_in(frame: bytes) -> list[wire.Request]:
    return [wire.request_decoder.decode(raw) for raw in wire.frame_decoder.decode(frame)]


def test_an_outbox_sends_what_one_loop_turn_put_as_one_frame_per_peer():
    async def scenario() -> list[tuple[str, list]]:
        sent: list[tuple[str, bytes]] = []
        outbox = wire.Outbox(lambda peer, frame: sent.append((peer, frame)))
        for i in range(3):
            outbox.put("a", wire.Hello(id=i))
        outbox.put("b", wire.Abort(id=9))
        assert sent == []  # nothing leaves before the turn ends
        await asyncio.sleep(0)
        outbox.put("a", wire.Hello(id=3))
        outbox.put("b", wire.Hello(id=4))
        outbox.close()  # sends what waits
        outbox.put("a", wire.Abort(id=3))  # after close: dropped, the socket is gone
        await asyncio.sleep(0)
        return [(peer, requests_in(frame)) for peer, frame in sent]

    assert asyncio.run(scenario()) == [("a", [wire.Hello(id=0), wire.Hello(id=1), wire.Hello(id=2)]),
                                       ("b", [wire.Abort(id=9)]), ("a", [wire.Hello(id=3)]),
                                       ("b", [wire.Hello(id=4)])]


def test_an_outbox_starts_a_new_frame_rather_than_pass_frame_bytes():
    """Four requests of ~0.9 MB each: frames stay within FRAME_BYTES (the core drops a frame past
    MAX_MESSAGE_BYTES and disconnects its sender), and every request arrives once, in order."""
    big = [wire.Classify(id=i, task="t", revision=1, method="hidden_anchor", queries=[[60_000] * 300_000],
                         timeout_s=1.0) for i in range(4)]

    async def scenario() -> list[bytes]:
        sent: list[bytes] = []
        outbox = wire.Outbox(lambda _, frame: sent.append(frame))
        for message in big:
            outbox.put(None, message)
        await asyncio.sleep(0)
        return sent

    frames = asyncio.run(scenario())
    assert len(frames) == 2 and all(len(frame) <= wire.FRAME_BYTES for frame in frames)
    assert [m for frame in frames for m in requests_in(frame)] == big


def test_a_frontend_that_outwaits_its_ready_wait_freezes_its_heap_once_the_core_describes_its_model(
        tmp_path, model_dir, monkeypatch):
    """Its tokenizer loads only then, and its objects are start-up's too: freezing before would
    leave them to every full collection. The core here is a ROUTER socket of the test's own."""
    monkeypatch.setattr(frontend, "READY_WAIT_S", 0.05)
    address = f"ipc://{tmp_path}/engine.sock"

    async def scenario() -> None:
        app = frontend.Frontend(Settings(tasks=[sentiment_task()]), address, str(tmp_path / "core.sock"))
        inbox: asyncio.Queue = asyncio.Queue()
        sent: list[str] = []

        async def send(message: dict) -> None:
            sent.append(message["type"])

        frozen = gc.get_freeze_count()
        await inbox.put({"type": "lifespan.startup"})
        lifespan = asyncio.create_task(app({"type": "lifespan"}, inbox.get, send))
        await until(lambda: sent == ["lifespan.startup.complete"])
        assert gc.get_freeze_count() == frozen  # no core yet: serving (503s), the heap not frozen
        context = zmq.asyncio.Context()
        core = context.socket(zmq.ROUTER)
        core.bind(address)
        try:
            sender, frame = await asyncio.wait_for(core.recv_multipart(), 30)
            [hello] = requests_in(frame)
            facts = wire.ModelFacts(id=hello.id, name="tiny", model_dir=str(model_dir), max_token_bytes=64,
                                    compute_type="cpu")
            await core.send_multipart([sender, wire.encoder.encode([facts])])
            await until(lambda: gc.get_freeze_count() > frozen)
            assert app.engine.ready
            await inbox.put({"type": "lifespan.shutdown"})
            await asyncio.wait_for(lifespan, 30)
        finally:
            gc.unfreeze()
            core.close(linger=0)
            context.term()

    asyncio.run(scenario())


@pytest.mark.parametrize(("engine_address", "on_loop"), [(None, False), ("ipc://{tmp}/engine.sock", True)])
def test_only_an_engine_core_runs_its_cpu_forwards_on_its_loop(tmp_path, model_dir, engine_address, on_loop):
    """Behind frontends the core's loop has only socket messages to handle; a single process's
    loop also parses HTTP, so its forwards stay on the model thread."""
    address = engine_address.format(tmp=tmp_path) if engine_address else None

    async def scenario() -> bool:
        state = ServerState(tiny_settings(model_dir, tmp_path / "state"), address)
        await state.start()
        try:
            return state.engine.scheduler.forwards_on_loop
        finally:
            await state.stop()

    assert asyncio.run(scenario()) is on_loop
