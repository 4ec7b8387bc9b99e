"""A real `python -m server` process on a loopback port, driven by the Python client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from clients import AnchorServeClient, AnchorServeError, AsyncAnchorServeClient
from clients.cli import main as client_cli
from clients.protocol import ClassifyResponse
from tests.conftest import save_tiny_model, sentiment_task


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(root, **settings):
    """`python -m server` with a config file (JSON is valid YAML); yields its URL, then SIGTERMs it."""
    model = save_tiny_model("gpt2", root / "model")
    config = root / "config.yaml"
    config.write_text(json.dumps({
        "model": str(model), "device": "cpu", "dtype": "float32", "state_dir": str(root / "state"),
        "tasks": [sentiment_task().model_dump(mode="json")],
    } | settings))
    port = free_port()
    env = os.environ | {"ANCHORSERVE_CONFIG": str(config), "PORT": str(port)}
    log = (root / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "server"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        with AnchorServeClient(url) as client:
            client.wait_ready(timeout=120)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after draining
        log.close()
        text = (root / "server.log").read_text()
        assert "ready after" in text and "stopped" in text
        for key in settings.get("api_key"), settings.get("admin_api_key"):
            assert key is None or key not in text  # keys are never logged


@pytest.fixture(scope="module", params=[0, 2], ids=["one-process", "two-frontends"])
def server_url(request, tmp_path_factory):
    """The server in one process, and as an engine core behind two HTTP frontends."""
    with running_server(tmp_path_factory.mktemp("uvicorn"), api_key="user-key", admin_api_key="admin-key",
                        api_servers=request.param) as url:
        yield url


def metric(metrics: str, name: str) -> float:
    """The value of an unlabelled series in /metrics' text."""
    return float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith(f"{name} ")))


def metrics_once(url: str, *lines: str, timeout: float = 30) -> str:
    """/metrics as soon as it contains every one of `lines`."""
    deadline = time.monotonic() + timeout
    while not all(line in (metrics := httpx.get(f"{url}/metrics").text) for line in lines):
        assert time.monotonic() < deadline, f"{lines} never all appeared in /metrics"
        time.sleep(0.05)
    return metrics


def test_disconnected_clients_do_not_use_a_batch_slot(tmp_path):
    """A request whose client leaves while it waits in the queue is dropped before the forward."""
    with running_server(tmp_path, max_wait_ms=1500) as url:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up while the batch window is open
            httpx.post(f"{url}/v1/classify", json={"task": "sentiment", "input": "x"}, timeout=0.3)
        # An empty queue after the disconnect: the batcher has taken the request, or dropped it.
        metrics = metrics_once(url, 'anchorserve_request_failure_total{reason="client_disconnected"} 1.0',
                               "anchorserve_queue_size 0.0")
    assert metric(metrics, "anchorserve_batch_size_count") == 0


def test_client_classifies_over_http(server_url):
    with AnchorServeClient(server_url, api_key="user-key", admin_key="admin-key") as client:
        out = client.classify("sentiment", ["a moving film", "dull"])
        assert [d.index for d in out.data] == [0, 1]
        assert {d.label for d in out.data} <= {"Negative", "Positive"}
        assert [t.name for t in client.tasks()] == ["sentiment"]
        created = client.create_task(sentiment_task(name="second").model_dump(mode="json"))
        assert created["name"] == "second"
        assert client.task("second").demonstrations == 3
        with pytest.raises(AnchorServeError) as info:
            client.classify("missing", "x")
        assert info.value.status == 404 and info.value.kind == "not_found"
        assert info.value.message.startswith("unknown task 'missing'")  # read from vLLM's nested error object
    with AnchorServeClient(server_url) as anonymous, pytest.raises(AnchorServeError) as info:
        anonymous.classify("sentiment", "x")
    assert info.value.status == 401


def test_async_client_runs_requests_concurrently(tmp_path):
    """The server holds each batch open for a second, so the requests the client has in flight at
    once share one forward; sent one after another, each would have a forward of its own."""
    async def run(url: str) -> list[ClassifyResponse]:
        async with AsyncAnchorServeClient(url) as client:
            return await asyncio.gather(*(client.classify("sentiment", f"text {i}") for i in range(16)))

    with running_server(tmp_path, max_wait_ms=1000) as url:
        results = asyncio.run(run(url))
        metrics = httpx.get(f"{url}/metrics").text
    assert [[d.index for d in r.data] for r in results] == [[0]] * 16
    assert metric(metrics, "anchorserve_batch_size_sum") == 16
    assert metric(metrics, "anchorserve_batch_size_count") == 1  # all 16 were in the server at the same time


def test_command_line_client(server_url, tmp_path, capsys):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("\n".join(json.dumps({"text": f"review {i}"}) for i in range(5)))
    code = client_cli(["--url", server_url, "--api-key", "user-key", "classify", "--task", "sentiment",
                       "--file", str(inputs), "--batch", "2", "extra text"])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["text"] for row in lines] == ["extra text"] + [f"review {i}" for i in range(5)]
    assert client_cli(["--url", server_url, "--api-key", "user-key", "classify", "--task", "nope", "x"]) == 1


def test_clients_run_an_analysis_job(server_url, tmp_path, capsys):
    rows = [{"text": f"review {i}", "label": "Positive" if i % 2 else "Negative"} for i in range(6)]
    with AnchorServeClient(server_url, admin_key="admin-key") as client:
        job = client.start_analysis("deep_layers", "sentiment", examples=rows, params={"seeds": [1]})
        done = client.wait_analysis(job["id"], timeout=120, interval=0.1)
        assert done["status"] == "succeeded" and len(done["results"]["auc_roc"]) == 3
        assert client.analysis_plot(job["id"], "deep_layers").startswith(b"\x89PNG")
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    code = client_cli(["--url", server_url, "--admin-key", "admin-key", "analyze", "isolation", "--task",
                       "sentiment", "--file", str(tmp_path / "rows.jsonl"), "--params", '{"ks": [1], "seeds": [1]}',
                       "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["ks"] == [1] and results["examples"] == [6]  # --params and every row of --file reached the job
    # Label loyalty is the share of the 6 rows whose prediction isolating k=1 layer left as it was, in %.
    shares = {round(100 * agreeing / 6, 9) for agreeing in range(7)}
    loyalty = results["label_loyalty"]
    assert {round(loyalty[where][what]["1"], 9) for where in ("first", "last") for what in ("label", "random")} \
        <= shares
    assert (out / "isolation.png").read_bytes().startswith(b"\x89PNG")


def test_hugging_face_inference_client_classifies_with_only_the_url_changed(server_url):
    """`huggingface_hub.InferenceClient(base_url=...)` posts {"inputs", "parameters"} to the base URL
    itself (as TEI serves classifiers); its answers are the server's own probabilities."""
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server_url, api_key="user-key")
    texts = ["a moving film", "dull"]
    answers = [client.text_classification(text) for text in texts]
    own = httpx.post(f"{server_url}/v1/classify", json={"task": "sentiment", "input": texts},
                     headers={"Authorization": "Bearer user-key"}).json()["data"]
    for answer, row in zip(answers, own, strict=True):
        assert answer[0].label == row["label"] and len(answer) == 2
        assert {e.label: e.score for e in answer} == pytest.approx(row["label_probs"], abs=1e-6)
    top = client.text_classification(texts[0], top_k=1, function_to_apply="none")
    assert len(top) == 1 and top[0].label == own[0]["label"]
    invocations = httpx.post(f"{server_url}/invocations", json={"inputs": texts},
                             headers={"Authorization": "Bearer user-key"})
    assert [rows[0]["label"] for rows in invocations.json()] == [row["label"] for row in own]
