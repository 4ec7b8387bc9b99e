"""Retries: the client retries idempotent requests only, after the server's Retry-After; the server
sends Retry-After on every 429 and 503.

The client's side runs against a scripted HTTP server on a loopback port, which records when each
request arrived, so the waits are measured as the server sees them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from anchor_cache.errors import UnavailableError
from clients import AnchorServeClient, AnchorServeError, AsyncAnchorServeClient
from tests.conftest import ADMIN, error_of, sentiment_task

# An error status and its headers, or None: close the connection without answering.
Answer = tuple[int, dict[str, str]] | None
# Valid for every call the tests make but predict: a ClassifyResponse, a TaskList, a job's dict.
SUCCESS = {"id": "classify-1", "model": "m", "data": [], "usage": {"prompt_tokens": 0, "total_tokens": 0}}
PREDICTED = [{"label": "a", "score": 1.0}]
TASK = {"name": "second", "template": "{text}", "labels": ["a", "b"], "demonstrations": []}


@contextlib.contextmanager
def scripted(*answers: Answer) -> Iterator[tuple[str, list[tuple[str, str, float]]]]:
    """A server that answers the i-th request with answers[i], then 200 SUCCESS (PREDICTED on /predict);
    yields its URL and the (method, path, time.monotonic()) of each request as it arrived."""
    script = list(answers)
    arrivals: list[tuple[str, str, float]] = []

    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            arrivals.append((self.command, self.path, time.monotonic()))
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            scripted_answer = script.pop(0) if script else (200, {})
            if scripted_answer is None:
                self.close_connection = True
                return
            status, headers = scripted_answer
            success = PREDICTED if self.path == "/predict" else SUCCESS
            body = json.dumps(success if status == 200 else {"error": "scripted", "type": "scripted"}).encode()
            self.send_response(status)
            for name, value in (headers | {"Content-Type": "application/json",
                                           "Content-Length": str(len(body))}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = answer

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", arrivals
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# --- the client ---------------------------------------------------------------------------------------

NOT_IDEMPOTENT: dict[str, tuple[Callable[[AnchorServeClient], Any], str]] = {
    "create_task": (lambda c: c.create_task(TASK), "/admin/tasks"),
    "start_analysis": (lambda c: c.start_analysis("saliency", "sentiment", examples=[]), "/admin/analyses"),
}


@pytest.mark.parametrize("status", [503, 429])
@pytest.mark.parametrize("call", NOT_IDEMPOTENT)
def test_a_post_that_writes_is_sent_once(call, status):
    """A 503 after the write was stored (a build the store stopped) must not be retried into a 409."""
    send, path = NOT_IDEMPOTENT[call]
    with scripted((status, {"Retry-After": "0"})) as (url, arrivals), AnchorServeClient(url) as client, \
            pytest.raises(AnchorServeError) as info:
        send(client)
    assert info.value.status == status
    assert [(method, p) for method, p, _ in arrivals] == [("POST", path)]


IDEMPOTENT: dict[str, tuple[Callable[[AnchorServeClient], Any], str, str]] = {
    "classify": (lambda c: c.classify("sentiment", "x"), "POST", "/v1/classify"),
    "predict": (lambda c: c.predict("x"), "POST", "/predict"),
    "tasks": (lambda c: c.tasks(), "GET", "/v1/tasks"),
    "replace_task": (lambda c: c.replace_task(TASK), "PUT", "/admin/tasks/second"),
    "delete_task": (lambda c: c.delete_task("second"), "DELETE", "/admin/tasks/second"),
}


@pytest.mark.parametrize("status", [503, 429])
@pytest.mark.parametrize("call", IDEMPOTENT)
def test_an_idempotent_request_waits_the_servers_retry_after(call, status):
    """backoff_s alone would retry within 0.2 s; the server asked for 1 s."""
    send, method, path = IDEMPOTENT[call]
    with scripted((status, {"Retry-After": "1"})) as (url, arrivals), AnchorServeClient(url) as client:
        send(client)
    assert [(m, p) for m, p, _ in arrivals] == [(method, path)] * 2
    waited = arrivals[1][2] - arrivals[0][2]
    assert 1.0 <= waited < 2.0, waited


def test_the_async_client_waits_the_servers_retry_after():
    async def classify(url: str) -> None:
        async with AsyncAnchorServeClient(url) as client:
            await client.classify("sentiment", "x")

    with scripted((503, {"Retry-After": "1"})) as (url, arrivals):
        asyncio.run(classify(url))
    assert len(arrivals) == 2
    assert 1.0 <= arrivals[1][2] - arrivals[0][2] < 2.0


def test_without_retry_after_the_client_backs_off_and_gets_through():
    with scripted((503, {}), (429, {})) as (url, arrivals), AnchorServeClient(url, backoff_s=0.05) as client:
        assert client.tasks() == []
    assert len(arrivals) == 3


def test_retries_stop_after_the_bound_on_tries():
    with scripted(*[(503, {"Retry-After": "0"})] * 10) as (url, arrivals), \
            AnchorServeClient(url, retries=3) as client, pytest.raises(AnchorServeError) as info:
        client.tasks()
    assert info.value.status == 503 and len(arrivals) == 4


def test_retries_stop_before_the_bound_on_time():
    """Tries at 0 s, 1 s and 2 s; a fourth would start at 3 s, past max_retry_s."""
    with scripted(*[(503, {"Retry-After": "1"})] * 10) as (url, arrivals), \
            AnchorServeClient(url, retries=10, max_retry_s=2.5) as client, pytest.raises(AnchorServeError) as info:
        client.tasks()
    assert info.value.status == 503 and len(arrivals) == 3


def test_a_dropped_connection_is_retried_only_for_an_idempotent_request():
    with scripted(None) as (url, arrivals), AnchorServeClient(url, backoff_s=0.05) as client:
        assert client.job("job-1") == SUCCESS
    assert [(m, p) for m, p, _ in arrivals] == [("GET", "/admin/jobs/job-1")] * 2
    with scripted(None) as (url, arrivals), AnchorServeClient(url) as client, \
            pytest.raises(httpx.RemoteProtocolError):
        client.create_task(TASK)
    assert len(arrivals) == 1


# --- the server ---------------------------------------------------------------------------------------


def test_a_full_queue_answers_429_with_retry_after(serve):
    client = serve(max_queued_requests=1)
    engine = client.app.state.anchor.engine
    run, running, release = engine._run_batch, threading.Event(), threading.Event()

    def held(*args: Any) -> Any:
        running.set()
        assert release.wait(30)
        return run(*args)

    engine.scheduler.run_batch = held
    body = {"task": "sentiment", "input": "x"}
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, "/v1/classify", json=body)
        try:
            assert running.wait(30)
            refused = client.post("/v1/classify", json=body)
        finally:
            release.set()
        assert first.result().status_code == 200
    assert "max_queued_requests" in error_of(refused, 429, "overloaded")
    assert refused.headers["retry-after"] == "1"


def test_a_build_the_store_stopped_answers_503_with_retry_after(serve):
    """The task's record is stored, then its cache cannot be: 503, and the same POST again is a 409,
    which is why the client sends such a POST once."""
    client = serve(admin_api_key="admin-secret")
    store = client.app.state.anchor.store
    put_blob = store.put_blob

    def down(name: str, data: bytes) -> None:
        raise UnavailableError("the state store test://down is unreachable")

    store.put_blob = down
    spec = sentiment_task(name="second", template="Opinion: {text}\nVerdict:").model_dump(mode="json")
    answer = client.post("/admin/tasks", json=spec, headers=ADMIN)
    error_of(answer, 503, "unavailable")
    assert answer.headers["retry-after"] == "5"
    store.put_blob = put_blob
    error_of(client.post("/admin/tasks", json=spec, headers=ADMIN), 409, "conflict")
