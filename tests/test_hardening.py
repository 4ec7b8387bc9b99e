"""The server under hostile input and faults: each test sends one such input or fault and checks
the answer: a clear 4xx JSON error, nothing lost, nothing leaked."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import ADMIN, QUERIES, error_of, sentiment_task

# --- 1. metric labels only for served tasks ----------------------------------------------------


def _series(metrics_text: str, name: str) -> list[str]:
    return [line for line in metrics_text.splitlines() if line.startswith(name + "{")]


def test_made_up_task_names_do_not_grow_the_metrics(serve):
    client = serve(admin_api_key="admin-secret")
    for i in range(200):
        error_of(client.post("/v1/classify", json={"task": f"made-up-{i}", "input": "x"}), 404, "not_found")
    text = client.get("/metrics").text
    assert "made-up" not in text
    assert len(_series(text, "anchorserve_requests_total")) <= 4  # route × status, task="" for all 200


def test_deleting_a_task_drops_its_series(serve):
    client = serve(admin_api_key="admin-secret")
    assert client.post("/admin/tasks", json=sentiment_task(name="brief").model_dump(mode="json"),
                       headers=ADMIN).status_code == 201
    assert client.post("/v1/classify", json={"task": "brief", "input": "x"}).status_code == 200
    assert 'task="brief"' in client.get("/metrics").text
    assert client.delete("/admin/tasks/brief", headers=ADMIN).status_code == 200
    assert 'task="brief"' not in client.get("/metrics").text
    assert 'task="sentiment"' in client.get("/metrics").text


# --- 2, 3. damaged persisted state: rebuilt, or reported failed while the others serve ------------


def test_damaged_cache_is_rebuilt_and_a_damaged_spec_is_reported_failed(serve, tmp_path):
    first = serve(admin_api_key="admin-secret")
    assert first.post("/admin/tasks", json=sentiment_task(name="other").model_dump(mode="json"),
                      headers=ADMIN).status_code == 201
    before = first.post("/v1/classify", json={"task": "sentiment", "input": QUERIES}).json()["data"]
    first.__exit__(None, None, None)
    state = tmp_path / "state"
    for tensors in (state / "caches").glob("*.safetensors"):
        data = bytearray(tensors.read_bytes())
        data[-4096:] = bytes(b ^ 0xFF for b in data[-4096:])  # bit rot inside the tensor bytes
        tensors.write_bytes(bytes(data))
    (state / "tasks" / "other.json").write_text('{"name": "other", "templ')
    second = serve(admin_api_key="admin-secret")
    ready = second.get("/ready").json()
    assert ready["tasks"] == ["sentiment"] and "other" in ready["failed"]
    assert str(tmp_path) not in json.dumps(ready)
    listed = second.get("/v1/tasks").json()
    assert [t["name"] for t in listed["data"]] == ["sentiment"] and listed["failed"][0]["name"] == "other"
    assert not second.get("/v1/tasks/sentiment").json()["loaded_from_disk"]  # rebuilt, not served rotten
    after = second.post("/v1/classify", json={"task": "sentiment", "input": QUERIES}).json()["data"]
    for got, want in zip(after, before, strict=True):
        assert got["probs"] == pytest.approx(want["probs"], abs=1e-6)
    error_of(second.post("/v1/classify", json={"task": "other", "input": "x"}), 503, "unavailable")
    assert any((state / "quarantine").iterdir())
    assert second.delete("/admin/tasks/other", headers=ADMIN).status_code == 200  # a failed task can go
    assert second.get("/ready").json()["failed"] == {}


# --- 4. text that is not Unicode, NUL bytes, files that are not UTF-8 ----------------------------

JSON = {"Content-Type": "application/json"}


def test_lone_surrogates_are_a_clear_json_error(serve):
    """422 on this server's own routes (an admin write), 400 on vLLM's, as vLLM answers."""
    client = serve(admin_api_key="admin-secret")
    message = error_of(client.post("/v1/classify", content=b'{"task": "sentiment", "input": "\\ud800"}',
                                   headers=JSON), 400, "validation")
    assert "surrogate" in message
    error_of(client.post("/v1/classify", content=b'{"task": "\\udfff", "input": "x"}', headers=JSON), 400,
             "validation")
    spec = json.dumps(sentiment_task(name="bad").model_dump(mode="json")).replace('"Positive"', '"Pos\\ud800"', 1)
    error_of(client.post("/admin/tasks", content=spec.encode(), headers=JSON | ADMIN), 422, "validation")
    assert client.post("/v1/classify", json={"task": "sentiment", "input": "still fine"}).status_code == 200


def test_nul_paths_and_non_utf8_files_are_422(serve, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "latin1.jsonl").write_bytes('{"text": "caf\xe9", "label": "Positive"}\n'.encode("latin-1"))
    client = serve(admin_api_key="admin-secret", data_root=root)
    url = "/admin/tasks/sentiment/reweighting"
    error_of(client.post(url, headers=ADMIN, json={"data": {"path": "data\u0000.jsonl"}}), 422, "validation")
    spec = sentiment_task(name="latin").model_dump(mode="json") | {"demonstrations": {"path": "latin1.jsonl"}}
    message = error_of(client.post("/admin/tasks", json=spec, headers=ADMIN), 422, "validation")
    assert "latin1.jsonl" in message and str(root) not in message


# --- 5. demonstration files only under data_root --------------------------------------------------


def test_demonstration_paths_stay_under_the_data_root(serve, tmp_path, dataset_dir):
    secret = tmp_path.parent / f"{tmp_path.name}-secret.jsonl"  # outside the data root
    secret.write_text('{"text": "private", "label": "hush-hush"}\n')
    spec = sentiment_task(name="files").model_dump(mode="json")
    closed = serve(admin_api_key="admin-secret")
    assert "DATA_ROOT" in error_of(closed.post("/admin/tasks", json=spec | {"demonstrations": {"path": str(secret)}},
                                               headers=ADMIN), 422, "validation")
    root = dataset_dir
    (root / "link.jsonl").symlink_to(secret)
    client = serve(admin_api_key="admin-secret", data_root=root)
    for path in (str(secret), f"../{secret.name}", "link.jsonl", "/etc/ssh/ssh_host_rsa_key", "/no/such/key"):
        message = error_of(client.post("/admin/tasks", json=spec | {"demonstrations": {"path": path}},
                                       headers=ADMIN), 422, "validation")
        assert "outside the data root" in message and "hush" not in message
    created = client.post("/admin/tasks", json=spec | {"demonstrations": {"path": "train.jsonl"}}, headers=ADMIN)
    assert created.status_code == 201, created.text
    persisted = json.loads((tmp_path / "state" / "tasks" / "files.json").read_text())["spec"]
    assert isinstance(persisted["demonstrations"], list)  # the draw is kept; the file is not needed again


# --- 6. huge inputs are refused before tokenising ------------------------------------------------


def test_huge_input_is_refused_before_tokenising(serve):
    client = serve(max_payload_bytes=2_000_000)
    service = client.app.state.anchor.classify
    calls = []
    encode = service.encode
    service.encode = lambda *args: calls.append(args) or encode(*args)
    message = error_of(client.post("/v1/classify", json={"task": "sentiment", "input": "word " * 180_000}), 400,
                       "input_limit")
    assert "bytes" in message and calls == []
    assert client.post("/v1/classify", json={"task": "sentiment", "input": ["word", "two words"]}).status_code == 200
    assert len(calls) == 1  # one tokenizer call for the request's inputs


# --- 8. the small ones ---------------------------------------------------------------------------


def test_chunked_body_over_the_limit_is_413(serve):
    client = serve(max_payload_bytes=2048)
    body = json.dumps({"task": "sentiment", "input": "x" * 4096}).encode()
    chunks = (body[i : i + 512] for i in range(0, len(body), 512))  # no Content-Length: chunked
    error_of(client.post("/v1/classify", content=chunks, headers=JSON), 413, "payload_too_large")
    small = json.dumps({"task": "sentiment", "input": "fine"}).encode()
    assert client.post("/v1/classify", content=iter([small[:10], small[10:]]), headers=JSON).status_code == 200


def test_405_names_the_allowed_methods(serve):
    response = serve().get("/v1/classify")
    error_of(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"


def test_a_template_longer_than_max_input_tokens_is_refused_at_create(serve):
    client = serve(admin_api_key="admin-secret", max_input_tokens=20)
    long = sentiment_task(name="long", template="Review of the film that we saw: " * 4 + "{text}\nSentiment:")
    message = error_of(client.post("/admin/tasks", json=long.model_dump(mode="json"), headers=ADMIN), 422,
                       "validation")
    assert "template alone" in message


def test_info_names_the_loaded_model_device_and_dtype(serve, model_dir):
    info = serve().get("/info").json()
    assert info["model"] == Path(model_dir).name and info["device"] == "cpu" and info["dtype"] == "float32"


def test_evaluation_only_method_is_refused_quietly(serve, caplog):
    client = serve()
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            error_of(client.post("/v1/classify", json={"task": "sentiment", "input": "x",
                                                       "method": "hidden_random_top"}), 400, "validation")
    assert not any(r.exc_info for r in caplog.records)


def test_error_bodies_name_no_server_path(serve, tmp_path, dataset_dir):
    """Each way a dataset path can fail (no such path, a path under a file, a folder without the
    split, a file that is not JSONL) names the path as the client gave it, never the data root."""
    (dataset_dir / "no-split").mkdir()
    (dataset_dir / "broken.jsonl").write_text('{"text": "x", "label"\n')
    client = serve(admin_api_key="admin-secret", data_root=dataset_dir)
    for path, names in (("nope", "'nope'"), ("train.jsonl/x", "'train.jsonl/x'"), ("no-split", "train.jsonl"),
                        ("broken.jsonl", "broken.jsonl:1")):
        response = client.post("/admin/tasks/sentiment/reweighting", headers=ADMIN, json={"data": {"path": path}})
        assert names in error_of(response, 422, "validation") and str(tmp_path) not in response.text, path


def test_every_response_carries_a_request_id(serve):
    client = serve()
    given = client.get("/health", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = client.post("/v1/classify", json={"task": "nope", "input": "x"}).headers["x-request-id"]
    assert len(made) >= 16
    assert client.get("/health", headers={"X-Request-ID": "bad id\twith spaces"}).headers["x-request-id"] != (
        "bad id\twith spaces")


@pytest.mark.parametrize("model", ["/no/such/model", "someone/some-hub-model"])
def test_a_bad_model_setting_exits_at_once_with_one_line(tmp_path, model):
    env = os.environ | {"ANCHORSERVE_MODEL": model, "ANCHORSERVE_STATE_DIR": str(tmp_path), "ANCHORSERVE_PORT": "1"}
    done = subprocess.run([sys.executable, "-m", "server"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "not a local model folder" in done.stderr


def test_a_model_that_fails_to_load_exits_non_zero(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')  # no weights, no tokenizer
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = os.environ | {"ANCHORSERVE_MODEL": str(broken), "ANCHORSERVE_STATE_DIR": str(tmp_path / "s"),
                        "ANCHORSERVE_PORT": str(port)}
    done = subprocess.run([sys.executable, "-m", "server"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "anchorserve: start-up failed: the model could not be loaded (the server log says why)")


# --- admin work is bounded before it starts ----------------------------------------------------


def test_oversized_specs_are_refused_before_tokenising(serve):
    """Counts and byte sizes are checked before the spec meets the tokenizer (whose work grows with it)."""
    client = serve(admin_api_key="admin-secret", max_demo_tokens=4096, max_train_examples=64)
    tokenized = []
    registry_check = client.app.state.anchor.engine.check
    client.app.state.anchor.engine.check = lambda spec: tokenized.append(spec) or registry_check(spec)
    base = sentiment_task(name="big").model_dump(mode="json")
    demo, other = {"text": "a fine film", "label": "Positive"}, {"text": "a dull film", "label": "Negative"}
    many = error_of(client.post("/admin/tasks", json=base | {"demonstrations": [demo, other] * 3000}, headers=ADMIN),
                    422, "validation")
    assert "6000 demonstrations" in many and "max_demo_tokens" in many
    long = error_of(client.post("/admin/tasks", json=base | {"demonstrations": [demo | {"text": "x" * 400_000}, other]},
                                headers=ADMIN), 422, "validation")
    assert "bytes, certainly more than" in long
    pool = error_of(client.post("/admin/tasks", json=base | {"examples": [demo] * 65}, headers=ADMIN), 422,
                    "validation")
    assert "65 rows" in pool and "max_train_examples" in pool
    assert tokenized == []
    assert client.post("/admin/tasks", json=base | {"examples": [demo] * 64}, headers=ADMIN).status_code in (201, 202)
    assert len(tokenized) == 1


def test_405_names_every_method_of_the_path(serve):
    client = serve(admin_api_key="admin-secret")
    for path in ("/admin/tasks/sentiment", "/admin/jobs/job-1", "/admin/analyses/job-1"):
        response = client.post(path, json={}, headers=ADMIN)
        error_of(response, 405, "method_not_allowed")
        assert "DELETE" in response.headers["allow"].split(", "), path


def test_if_match_of_any_shape_is_a_412_with_a_short_body(serve):
    """A value that is no list of entity tags makes the condition false (RFC 9110 §13.1.1)."""
    client = serve(admin_api_key="admin-secret")
    spec = sentiment_task().model_dump(mode="json")
    for value in ("9" * 4301, '"' + "9" * 4301 + '"', "+12", "W/\"x\"", "", "1e3", '"1', "1"):
        response = client.put("/admin/tasks/sentiment", json=spec, headers=ADMIN | {"If-Match": value})
        error_of(response, 412, "precondition_failed")
        assert len(response.text) < 1000


def test_media_types_are_parsed(serve):
    client = serve()
    body = json.dumps({"input": "fine"}).encode()
    for content_type in ("APPLICATION/JSON", "application/json; charset=utf-8", "Application/Json ;charset=UTF-8"):
        assert client.post("/v1/classify", content=body, headers={"Content-Type": content_type}).status_code == 200
    for content_type in ("application/jsonx", "text/plain", "application/json-seq"):
        error_of(client.post("/v1/classify", content=body, headers={"Content-Type": content_type}), 415,
                 "unsupported_media_type")


def test_booleans_are_strict(serve):
    client = serve()
    for field, value in (("truncate", 0), ("truncate", "yes"), ("truncate", 1)):
        error_of(client.post("/v1/classify", json={"input": "fine", field: value}), 400, "validation")
    error_of(client.post("/predict", json={"inputs": "fine", "raw_scores": 1}), 422, "validation")


def test_error_bodies_do_not_echo_large_inputs(serve):
    client = serve(max_payload_bytes=2_000_000)
    huge = {"input": [{"not": "a string"}] * 20_000}  # 20,000 field errors
    response = client.post("/v1/classify", json=huge)
    assert len(response.content) < 4000 and "more errors" in error_of(response, 400, "validation")


def test_large_inputs_tokenise_while_every_admin_thread_is_busy(serve):
    """Admin work (task checks, file reads, store calls) runs on the event loop's default threads;
    large inputs are tokenised on classification's own, so a flood of admin work cannot hold a
    classification up (six concurrent oversized creates once made one wait 95 s)."""
    client = serve(max_payload_bytes=2_000_000, max_input_tokens=128)
    gate = threading.Event()

    async def occupy_default_threads() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(64):  # more than any default pool has threads
            loop.run_in_executor(None, gate.wait, 30)

    answer: list = []
    request = threading.Thread(target=lambda: answer.append(client.post(
        "/v1/classify", json={"input": "a moving film " * 2000, "truncate": True})))
    try:
        client.portal.call(occupy_default_threads)
        request.start()
        request.join(20)
        assert answer and answer[0].status_code == 200, answer and answer[0].text
    finally:
        gate.set()
        request.join()
