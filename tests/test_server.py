"""The HTTP server in process (TestClient runs the lifespan), on a tiny Llama model."""

from __future__ import annotations

import asyncio
import importlib
import itertools
import json
import pkgutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi import APIRouter
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from httpx import Response

import server.api
from anchor_cache import Classifier, load_model, reweighting
from anchor_cache.errors import Cancelled, UnavailableError
from anchor_cache.registry import TaskRegistry
from server.app import build_app
from server.protocol import ClassifyResponse, TaskInfo
from server.settings import Settings
from tests.conftest import ADMIN, QUERIES, error_of, sentiment_task, settings


def test_classify_matches_the_engine(serve, model_dir):
    client = serve()
    response = client.post("/v1/classify", json={"task": "sentiment", "input": QUERIES})
    assert response.status_code == 200
    parsed = ClassifyResponse.model_validate(response.json())
    assert parsed.object == "list" and parsed.id == "classify-" + response.headers["x-request-id"]
    assert [d.index for d in parsed.data] == [0, 1, 2]
    expected = Classifier(load_model(str(model_dir), "cpu", "float32"), sentiment_task()).classify(QUERIES)
    for got, want in zip(parsed.data, expected, strict=True):
        assert got.label == want.label and got.num_classes == 2
        assert got.label_probs == pytest.approx(want.probs, abs=1e-5)
    assert parsed.usage.prompt_tokens > 0
    single = client.post("/v1/classify", json={"task": "sentiment", "input": QUERIES[0], "method": "vanilla"})
    assert single.status_code == 200 and len(single.json()["data"]) == 1


def test_health_ready_info_tasks_and_docs(serve):
    client = serve()
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["tasks"] == ["sentiment"]
    info = client.get("/info").json()
    assert info["max_inputs_per_request"] == 32 and info["api_key"] == "unset"
    task = TaskInfo.model_validate(client.get("/v1/tasks/sentiment").json())
    assert task.method == "hidden_anchor" and 0 < task.anchor_tokens < task.context_tokens and task.cache_bytes > 0
    assert client.get("/v1/tasks").json()["count"] == 1
    assert client.get("/docs").status_code == 200 and "/v1/classify" in client.get("/openapi.json").json()["paths"]


def test_api_key_protects_v1_only(serve):
    client = serve(api_key="user-secret")
    body = {"task": "sentiment", "input": "x"}
    error_of(client.post("/v1/classify", json=body), 401, "unauthorized")
    error_of(client.post("/v1/classify", json=body, headers={"Authorization": "Bearer nope"}), 401, "unauthorized")
    assert client.post("/v1/classify", json=body, headers={"Authorization": "Bearer user-secret"}).status_code == 200
    for public in ("/health", "/ready", "/metrics"):
        assert client.get(public).status_code == 200


def test_admin_is_disabled_without_a_key(serve):
    client = serve()
    error_of(client.post("/admin/tasks", json=sentiment_task().model_dump(mode="json")), 404, "not_found")


def test_admin_key_is_separate(serve):
    client = serve(api_key="user-secret", admin_api_key="admin-secret")
    spec = sentiment_task(name="other").model_dump(mode="json")
    error_of(client.post("/admin/tasks", json=spec, headers={"Authorization": "Bearer user-secret"}), 401,
             "unauthorized")


@pytest.mark.parametrize(
    ("payload", "status", "kind", "message"),
    [
        ({"task": "nope", "input": "x"}, 404, "not_found", "unknown task 'nope'"),
        ({"task": "sentiment", "input": []}, 400, "empty_input", "input is empty"),
        ({"task": "sentiment", "input": ""}, 400, "empty_input", "empty text"),
        ({"task": "sentiment", "input": ["x"] * 3}, 400, "input_limit", "limit is 2"),
        ({"task": "sentiment", "input": "word " * 80}, 400, "input_limit", "max_input_tokens"),
        ({"task": "sentiment", "input": "x", "method": "magic"}, 400, "validation", "method"),
        ({"task": "sentiment", "input": "x", "extra": 1}, 400, "validation", "extra"),
        ({"task": ["sentiment"], "input": "x"}, 400, "validation", "task"),
    ],
)
def test_bad_requests_get_clear_errors(serve, payload, status, kind, message):
    """vLLM's route answers 400 to any invalid request, as vLLM does."""
    client = serve(max_inputs_per_request=2, max_input_tokens=40)
    assert message in error_of(client.post("/v1/classify", json=payload), status, kind)


@pytest.mark.parametrize(
    ("payload", "status", "kind", "tei_type"),
    [
        ({"inputs": []}, 400, "empty_input", "empty"),
        ({"inputs": ""}, 400, "empty_input", "empty"),
        ({"inputs": [["x"]] * 3}, 413, "input_limit", "validation"),
        ({"inputs": "word " * 80}, 413, "input_limit", "validation"),
        ({"inputs": "x", "extra": 1}, 422, "validation", "validation"),
    ],
)
def test_tei_route_answers_teis_statuses(serve, payload, status, kind, tei_type):
    """TEI's: 400 for an empty input, 413 past its limits, 422 for a body it cannot read."""
    client = serve(max_inputs_per_request=2, max_input_tokens=40)
    response = client.post("/predict", json=payload)
    error_of(response, status, kind)
    assert response.json()["error_type"] == tei_type


def test_malformed_json_payload_size_and_media_type(serve):
    client = serve(max_payload_bytes=2048)
    headers = {"Content-Type": "application/json"}
    error_of(client.post("/v1/classify", content=b'{"task": ', headers=headers), 400, "malformed_json")
    error_of(client.post("/v1/classify", content=b"task=x", headers={"Content-Type": "text/plain"}), 415,
             "unsupported_media_type")
    big = json.dumps({"task": "sentiment", "input": "x" * 4096})
    error_of(client.post("/v1/classify", content=big, headers=headers), 413, "payload_too_large")


def test_truncation_keeps_the_template(serve):
    client = serve(max_input_tokens=40, truncate=True)
    response = client.post("/v1/classify", json={"task": "sentiment", "input": "word " * 500})
    assert response.status_code == 200 and response.json()["usage"]["prompt_tokens"] <= 40


def _slow(client: TestClient, seconds: float) -> None:
    """Every forward takes `seconds` longer: the sleep is the slow model the queue limits are tested
    against, not a wait for something to happen."""
    engine = client.app.state.anchor.engine
    run = engine._run_batch

    def slow_run(*args):
        time.sleep(seconds)
        return run(*args)

    engine.scheduler.run_batch = slow_run


def test_full_queue_answers_429_and_deadline_504(serve):
    client = serve(max_queued_requests=1, request_timeout_s=5)
    _slow(client, 0.5)
    body = {"task": "sentiment", "input": "x"}
    with ThreadPoolExecutor(4) as pool:
        codes = sorted(r.status_code for r in pool.map(lambda _: client.post("/v1/classify", json=body), range(4)))
    assert codes[0] == 200 and 429 in codes
    quick = serve(request_timeout_s=0.1)
    _slow(quick, 0.5)
    error_of(quick.post("/v1/classify", json=body), 504, "timeout")


def test_concurrent_requests_are_batched(serve):
    client = serve(max_wait_ms=50)
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda t: client.post("/v1/classify", json={"task": "sentiment", "input": t}).status_code,
                              QUERIES * 4))
    assert codes == [200] * 12
    metrics = client.get("/metrics").text
    batches = float(next(line.split()[-1] for line in metrics.splitlines()
                         if line.startswith("anchorserve_batch_size_count")))
    assert batches < 12
    assert 'anchorserve_requests_total{route="/v1/classify",status="200",task="sentiment"} 12.0' in metrics
    assert 'anchorserve_anchor_cache_bytes{task="sentiment"}' in metrics


def test_admin_create_replace_delete(serve):
    client = serve(admin_api_key="admin-secret")
    spec = sentiment_task(name="reviews").model_dump(mode="json")
    created = client.post("/admin/tasks", json=spec, headers=ADMIN)
    assert created.status_code == 201, created.text
    assert created.json()["name"] == "reviews"
    error_of(client.post("/admin/tasks", json=spec, headers=ADMIN), 409, "conflict")
    assert client.post("/v1/classify", json={"task": "reviews", "input": "x"}).status_code == 200
    spec["labels"] = ["World", "Sports"]
    spec["demonstrations"] = [{"text": "a", "label": "World"}, {"text": "b", "label": "Sports"}]
    assert client.put("/admin/tasks/reviews", json=spec, headers=ADMIN).status_code == 201
    out = client.post("/v1/classify", json={"task": "reviews", "input": "x"}).json()
    assert set(out["data"][0]["label_probs"]) == {"World", "Sports"}
    assert client.delete("/admin/tasks/reviews", headers=ADMIN).json() == {"deleted": "reviews"}
    error_of(client.post("/v1/classify", json={"task": "reviews", "input": "x"}), 404, "not_found")
    error_of(client.delete("/admin/tasks/reviews", headers=ADMIN), 404, "not_found")


def test_failed_rebuild_keeps_the_old_task(serve):
    client = serve(admin_api_key="admin-secret")
    before = client.post("/v1/classify", json={"task": "sentiment", "input": QUERIES}).json()["data"]
    bad = sentiment_task().model_dump(mode="json") | {"labels": ["Zq1", "Zq2"]}
    bad["demonstrations"] = [{"text": "a", "label": "Zq1"}, {"text": "b", "label": "Zq2"}]
    assert "share their first token" in error_of(client.put("/admin/tasks/sentiment", json=bad, headers=ADMIN),
                                                 422, "validation")
    after = client.post("/v1/classify", json={"task": "sentiment", "input": QUERIES}).json()["data"]
    assert after == before


def test_concurrent_admin_writes_leave_one_consistent_task(serve, tmp_path):
    client = serve(admin_api_key="admin-secret")
    specs = [sentiment_task(name="race", template=f"Review {i}: {{text}}\nSentiment:").model_dump(mode="json")
             for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda s: client.put("/admin/tasks/race", json=s, headers=ADMIN).status_code, specs))
    assert codes == [201] * 6  # ordered by revision; the last one stored wins
    served = client.get("/v1/tasks/race")
    stored = json.loads((tmp_path / "state" / "tasks" / "race.json").read_text())
    assert served.json()["template"] == stored["spec"]["template"]
    assert served.headers["etag"] == f'"{stored["revision"]}"' == f'"{served.json()["revision"]}"'


def test_if_match_star_weak_and_listed_tags_on_admin_task_routes(serve):
    """RFC 9110 §13.1.1: `*` matches any current version, a list matches when one strong tag is the
    ETag, and a weak tag never matches (strong comparison); a failed condition writes nothing."""
    client = serve(admin_api_key="admin-secret")
    spec = sentiment_task(template="Opinion: {text}\nVerdict:").model_dump(mode="json")

    def put(if_match: str) -> Response:
        return client.put("/admin/tasks/sentiment", json=spec, headers=ADMIN | {"If-Match": if_match})

    etag = client.get("/v1/tasks/sentiment").headers["etag"]
    for weak in (f"W/{etag}", f'"0", W/{etag}'):
        assert "weak" in error_of(put(weak), 412, "precondition_failed")
        error_of(client.delete("/admin/tasks/sentiment", headers=ADMIN | {"If-Match": weak}), 412,
                 "precondition_failed")
    assert client.get("/v1/tasks/sentiment").headers["etag"] == etag  # nothing was written
    assert put(f'"0", W/"9", {etag}').status_code == 201
    listed = client.get("/v1/tasks/sentiment")
    assert listed.json()["template"] == spec["template"] and listed.headers["etag"] != etag
    assert put("*").status_code == 201
    last = client.get("/v1/tasks/sentiment").headers["etag"]
    assert client.delete("/admin/tasks/sentiment", headers=ADMIN | {"If-Match": "*"}).status_code == 200
    # No current version: `*` fails instead of creating the task, and so does the deleted task's last ETag.
    for stale in ("*", last):
        assert "does not exist" in error_of(put(stale), 412, "precondition_failed")
    error_of(client.get("/v1/tasks/sentiment"), 404, "not_found")


def test_restart_loads_persisted_caches_and_tasks(serve, tmp_path):
    first = serve(admin_api_key="admin-secret")
    assert not first.get("/v1/tasks/sentiment").json()["loaded_from_disk"]
    first.post("/admin/tasks", json=sentiment_task(name="extra").model_dump(mode="json"), headers=ADMIN)
    before = first.post("/v1/classify", json={"task": "sentiment", "input": QUERIES}).json()["data"]
    first.__exit__(None, None, None)
    second = serve(admin_api_key="admin-secret")
    assert second.get("/v1/tasks/sentiment").json()["loaded_from_disk"]
    assert second.get("/v1/tasks/extra").json()["loaded_from_disk"]
    assert 'anchorserve_task_loads_total{source="disk",task="sentiment"} 1.0' in second.get("/metrics").text
    assert second.post("/v1/classify", json={"task": "sentiment", "input": QUERIES}).json()["data"] == before
    second.delete("/admin/tasks/sentiment", headers=ADMIN)
    second.__exit__(None, None, None)
    third = serve()
    assert third.get("/ready").json()["tasks"] == ["extra"]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unique"):
        Settings(tasks=[sentiment_task(), sentiment_task()])
    with pytest.raises(ValueError, match="max_input_tokens"):
        Settings(max_input_tokens=10_000, max_batch_tokens=100)


def test_missing_model_is_reported_by_ready(serve, tmp_path):
    client = TestClient(build_app(settings(tmp_path / "no-model", tmp_path / "s2")))
    with client:
        deadline = time.monotonic() + 10
        while "start-up failed" not in client.get("/ready").text and time.monotonic() < deadline:
            time.sleep(0.05)
        message = error_of(client.get("/ready"), 503, "unavailable")
        assert "could not be loaded" in message and str(tmp_path) not in message
        assert client.get("/health").status_code == 200


def test_task_count_and_demonstration_token_limits(serve):
    client = serve(admin_api_key="admin-secret", max_tasks=2, max_demo_tokens=60)
    long_demos = sentiment_task(name="long").model_dump(mode="json")
    long_demos["demonstrations"][0]["text"] = "the quick brown fox " * 20
    assert "limit is 60" in error_of(client.post("/admin/tasks", json=long_demos, headers=ADMIN), 422, "validation")
    assert client.post("/admin/tasks", json=sentiment_task(name="b").model_dump(mode="json"),
                       headers=ADMIN).status_code == 201
    error_of(client.post("/admin/tasks", json=sentiment_task(name="c").model_dump(mode="json"), headers=ADMIN),
             409, "conflict")


def _wait_job(client: TestClient, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/admin/jobs/{job_id}", headers=ADMIN).json()
        if job["finished"] is not None:
            return job
        time.sleep(0.05)
    raise TimeoutError(job)


TRAIN = [{"text": t, "label": label} for t, label in
         [("a wonderful film", "Positive"), ("dull", "Negative"), ("moving", "Positive"), ("a waste", "Negative")]]


def test_reweighting_job_trains_persists_and_serves_beta(serve):
    client = serve(admin_api_key="admin-secret")
    before = client.post("/v1/classify", json={"task": "sentiment", "input": QUERIES}).json()["data"]
    started = client.post("/admin/tasks/sentiment/reweighting", headers=ADMIN,
                          json={"examples": TRAIN, "lr": 0.5, "epochs": 3})
    assert started.status_code == 202
    job = _wait_job(client, started.json()["job"])
    assert job["status"] == "succeeded", job["error"]
    assert len(job["result"]["epoch_losses"]) == 3 and len(job["result"]["step_losses"]) == 12
    info = TaskInfo.model_validate(client.get("/v1/tasks/sentiment").json())
    assert info.reweighted and info.reweighting["train_examples"] == 4
    after = client.post("/v1/classify", json={"task": "sentiment", "input": QUERIES}).json()["data"]
    assert after != before
    client.__exit__(None, None, None)
    restarted = serve(admin_api_key="admin-secret")
    assert restarted.get("/v1/tasks/sentiment").json()["reweighted"]
    again = restarted.post("/v1/classify", json={"task": "sentiment", "input": QUERIES}).json()["data"]
    for got, want in zip(again, after, strict=True):
        assert got["probs"] == pytest.approx(want["probs"], abs=1e-6)


def test_reweighting_refuses_bad_training_input(serve, tmp_path):
    client = serve(admin_api_key="admin-secret", data_root=tmp_path)
    url = "/admin/tasks/sentiment/reweighting"
    error_of(client.post(url, headers=ADMIN, json={"examples": [{"text": "x", "label": "Maybe"}]}), 422,
             "validation")
    error_of(client.post(url, headers=ADMIN, json={}), 422, "validation")
    assert "outside" in error_of(client.post(url, headers=ADMIN, json={"data": {"path": "../../etc"}}), 422,
                                 "validation")
    error_of(client.post("/admin/tasks/nope/reweighting", headers=ADMIN, json={"examples": TRAIN}), 404, "not_found")
    plain = sentiment_task(name="plain", reweight=False).model_dump(mode="json")
    assert client.post("/admin/tasks", headers=ADMIN, json=plain).status_code == 201
    assert "reweight: true" in error_of(client.post("/admin/tasks/plain/reweighting", headers=ADMIN,
                                                    json={"examples": TRAIN}), 409, "conflict")


def test_reweighting_from_a_dataset_under_the_data_root(serve, dataset_dir):
    client = serve(admin_api_key="admin-secret", data_root=dataset_dir.parent)
    started = client.post("/admin/tasks/sentiment/reweighting", headers=ADMIN,
                          json={"data": {"path": dataset_dir.name, "per_class": 2}, "epochs": 1})
    assert _wait_job(client, started.json()["job"])["status"] == "succeeded"


def test_cancelled_training_keeps_the_previous_beta(serve, monkeypatch):
    client = serve(admin_api_key="admin-secret")
    training = threading.Event()
    forward = reweighting.extend_cache

    def observed(*args: Any) -> Any:  # a training row's forward: the job is training
        training.set()
        return forward(*args)

    monkeypatch.setattr(reweighting, "extend_cache", observed)
    before = client.post("/v1/classify", json={"task": "sentiment", "input": QUERIES}).json()["data"]
    started = client.post("/admin/tasks/sentiment/reweighting", headers=ADMIN,
                          json={"examples": TRAIN * 50, "epochs": 200})
    job_id = started.json()["job"]
    assert training.wait(30), "training never started"
    assert client.delete(f"/admin/jobs/{job_id}", headers=ADMIN).status_code == 200
    assert _wait_job(client, job_id)["status"] == "cancelled"
    assert not client.get("/v1/tasks/sentiment").json()["reweighted"]
    assert client.post("/v1/classify", json={"task": "sentiment", "input": QUERIES}).json()["data"] == before


@pytest.mark.parametrize("job", ["training", "build"])
def test_shutdown_neither_waits_for_a_job_thread_nor_blocks_the_event_loop(serve, monkeypatch, job):
    """A job whose thread is inside one long step (a training row's forward on its nice-19 thread,
    a cache build on the model thread) cannot hear a cancel until the step ends: shutdown must leave the thread
    to finish on its own, and the event loop must keep running meanwhile."""
    client = serve(admin_api_key="admin-secret", admin_sync_wait_s=0)
    state = client.app.state.anchor
    inside, release = threading.Event(), threading.Event()

    def one_long_step(*args: Any, **kwargs: Any) -> Any:
        inside.set()
        release.wait(30)
        raise Cancelled("released by the test")

    if job == "training":
        monkeypatch.setattr(reweighting, "extend_cache", one_long_step)
        started = client.post("/admin/tasks/sentiment/reweighting", headers=ADMIN, json={"examples": TRAIN})
    else:
        monkeypatch.setattr(TaskRegistry, "prepare", one_long_step)
        spec = sentiment_task(template="Opinion: {text}\nVerdict:").model_dump(mode="json")
        started = client.put("/admin/tasks/sentiment", json=spec, headers=ADMIN)
    assert started.status_code == 202, started.text
    assert inside.wait(30)

    async def stop() -> tuple[float, float]:
        """Seconds the server's stop took, and the longest the event loop went without a turn meanwhile."""
        turns = [time.monotonic()]

        async def tick() -> None:
            while True:
                await asyncio.sleep(0.01)
                turns.append(time.monotonic())

        ticking = asyncio.create_task(tick())
        await state.stop()
        took = time.monotonic() - turns[0]
        ticking.cancel()
        turns.append(time.monotonic())
        return took, max(b - a for a, b in itertools.pairwise(turns))

    # If shutdown waits for the thread after all, the step ends after 10 s instead of hanging the test.
    unblock = threading.Timer(10, release.set)
    unblock.start()
    try:
        took, longest_stall = client.portal.call(stop)
        assert not release.is_set(), "shutdown returned only once the job's step ended"
    finally:
        unblock.cancel()
        release.set()
    assert took < 5 and longest_stall < 1, (took, longest_stall)


def test_calibrated_task_returns_raw_and_calibrated_probabilities(serve):
    client = serve(tasks=[sentiment_task(calibrate=True)])
    data = client.post("/v1/classify", json={"task": "sentiment", "input": QUERIES}).json()["data"]
    assert all(d["raw_label_probs"] is not None and d["raw_label_probs"] != d["label_probs"] for d in data)
    assert all(abs(sum(d["probs"]) - 1) < 1e-5 for d in data)


ROWS = [{"text": q, "label": "Positive" if i % 2 else "Negative"} for i, q in enumerate(QUERIES * 2)]


def _wait_analysis(client: TestClient, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/admin/analyses/{job_id}", headers=ADMIN).json()
        if job["status"] not in ("pending", "running"):
            return job
        time.sleep(0.05)
    raise TimeoutError(job)


@pytest.mark.parametrize("kind", ["saliency", "isolation", "deep_layers", "error_diagnosis"])
def test_analysis_job_reports_results_progress_and_plots(serve, kind):
    client = serve(admin_api_key="admin-secret")
    params = {"error_diagnosis": {"limit": 6}, "isolation": {"ks": [0, 1], "limit": 6}}.get(
        kind, {"seeds": [1, 2], "limit": 6})
    started = client.post("/admin/analyses", headers=ADMIN,
                          json={"kind": kind, "task": "sentiment", "data": {"examples": ROWS}, "params": params})
    assert started.status_code == 202, started.text
    job = _wait_analysis(client, started.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"]["done"] == job["progress"]["total"] > 0 and job["params"]["limit"] == 6
    assert job["results"]["kind"] == kind and job["results"]["layers"] == 3
    for url in job["plots"].values():
        png = client.get(url, headers=ADMIN)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content.startswith(b"\x89PNG")
    assert client.post("/v1/classify", json={"task": "sentiment", "input": QUERIES}).status_code == 200


def test_analysis_endpoints_enforce_auth(serve):
    closed = serve()
    error_of(closed.post("/admin/analyses", json={}), 404, "not_found")
    client = serve(admin_api_key="admin-secret")
    body = {"kind": "deep_layers", "task": "sentiment", "data": {"examples": ROWS}}
    error_of(client.post("/admin/analyses", json=body), 401, "unauthorized")
    error_of(client.post("/admin/analyses", json=body, headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
    error_of(client.get("/admin/analyses/job-x"), 401, "unauthorized")


def test_analysis_endpoints_enforce_limits(serve, dataset_dir):
    client = serve(admin_api_key="admin-secret", data_root=dataset_dir.parent, max_analysis_examples=12,
                   max_analysis_tokens=64, max_attention_map_values=100)

    def post(**changes):
        body = {"kind": "deep_layers", "task": "sentiment", "data": {"examples": ROWS}, "params": {"seeds": [1]}}
        return client.post("/admin/analyses", headers=ADMIN, json=body | changes)

    assert "limit is 12" in error_of(post(params={"seeds": [1, 2, 3]}), 422, "validation")
    assert "max_analysis_tokens" in error_of(post(params={"seeds": [1], "max_tokens": 65}), 422, "validation")
    error_of(post(params={"seeds": [1], "attention_maps": 1, "max_map_values": 101}), 422, "validation")
    error_of(post(params={"seeds": [1], "bogus": 1}), 422, "validation")
    assert "ks" in error_of(post(kind="isolation", params={"ks": [9]}), 422, "validation")
    error_of(post(kind="astrology"), 422, "validation")
    error_of(post(task="nope"), 404, "not_found")
    assert "outside" in error_of(post(data={"path": "../../etc"}), 422, "validation")
    error_of(post(data={"examples": [{"text": "x", "label": "Maybe"}]}), 422, "validation")
    error_of(post(data={"examples": ROWS, "path": "x"}), 422, "validation")
    error_of(post(demonstrations="drawn"), 422, "validation")  # inline rows have no train split
    drawn = post(data={"path": dataset_dir.name}, demonstrations="drawn", params={"seeds": [1, 2], "limit": 4})
    assert drawn.status_code == 202, drawn.text
    assert _wait_analysis(client, drawn.json()["id"])["status"] == "succeeded"
    error_of(client.get("/admin/analyses/job-nope", headers=ADMIN), 404, "not_found")
    error_of(client.get(f"/admin/analyses/{drawn.json()['id']}/plots/nope.png", headers=ADMIN), 404, "not_found")


def test_one_analysis_at_a_time_and_cancellation(serve):
    client = serve(admin_api_key="admin-secret", max_analysis_examples=100_000)
    body = {"kind": "isolation", "task": "sentiment", "data": {"examples": ROWS * 100},
            "params": {"seeds": [1, 2, 3], "batch_size": 1, "ks": [1, 2]}}
    first = client.post("/admin/analyses", headers=ADMIN, json=body)
    assert first.status_code == 202, first.text
    error_of(client.post("/admin/analyses", headers=ADMIN, json=body), 429, "overloaded")
    # Classification goes first while the job runs.
    assert client.post("/v1/classify", json={"task": "sentiment", "input": QUERIES}).status_code == 200
    job_id = first.json()["id"]
    assert client.delete(f"/admin/analyses/{job_id}", headers=ADMIN).status_code == 200
    job = _wait_analysis(client, job_id)
    assert job["status"] == "cancelled" and job["error"]["type"] == "cancelled"
    again = body | {"kind": "deep_layers", "params": {"limit": 2}}
    assert client.post("/admin/analyses", headers=ADMIN, json=again).status_code == 202


def test_requests_of_different_tasks_share_forwards_and_match_the_engine(serve, model_dir):
    topics = sentiment_task(name="topics", labels=["World", "Sports", "Business"], demonstrations=[
        {"text": "the match ended in a draw", "label": "Sports"}, {"text": "markets fell", "label": "Business"},
        {"text": "talks in the capital", "label": "World"}])
    client = serve(tasks=[sentiment_task(), topics], max_wait_ms=100)
    jobs = [(task, text) for text in QUERIES for task in ("sentiment", "topics")] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda j: client.post("/v1/classify", json={"task": j[0], "input": j[1]}), jobs))
    lm = load_model(str(model_dir), "cpu", "float32")
    engines = {"sentiment": Classifier(lm, sentiment_task()), "topics": Classifier(lm, topics)}
    for (task, text), answer in zip(jobs, answers, strict=True):
        assert answer.status_code == 200, answer.text
        want = engines[task].classify([text])[0]
        got = answer.json()["data"][0]
        assert got["label"] == want.label and got["label_probs"] == pytest.approx(want.probs, abs=1e-5)
    metrics = client.get("/metrics").text
    forwards = float(next(line.split()[-1] for line in metrics.splitlines()
                          if line.startswith("anchorserve_batch_size_count")))
    assert forwards < len(jobs)


def test_a_write_the_store_outage_stopped_is_built_once_the_store_is_back(serve):
    """The record is stored, then the store fails before the build saves its cache: 503 (never a
    201 for a write not served), no rollback, and the resync builds the stored revision later."""
    client = serve(admin_api_key="admin-secret", sync_interval_s=0.2)
    store = client.app.state.anchor.store
    put_blob = store.put_blob

    def down(name: str, data: bytes) -> None:
        raise UnavailableError("the state store test://down is unreachable")

    store.put_blob = down
    spec = sentiment_task(template="Opinion: {text}\nVerdict:").model_dump(mode="json")
    answer = client.put("/admin/tasks/sentiment", json=spec, headers=ADMIN)
    message = error_of(answer, 503, "unavailable")
    stored = store.record("sentiment")
    assert f"revision {stored.revision}" in message and stored.spec["template"] == spec["template"]
    assert client.get("/v1/tasks/sentiment").json()["template"] != spec["template"]  # the old one serves
    store.put_blob = put_blob
    deadline = time.monotonic() + 30
    while client.get("/v1/tasks/sentiment").json()["revision"] != stored.revision:
        assert time.monotonic() < deadline, "the stored revision was never built"
        time.sleep(0.05)
    assert client.get("/v1/tasks/sentiment").json()["template"] == spec["template"]


def test_a_store_that_lost_its_records_refuses_writes(serve, tmp_path):
    """The state dir loses its records and counter (as a Redis restarted without persistence would):
    a write would get revision 1, below what the replica serves, so it is refused, not acknowledged."""
    client = serve(admin_api_key="admin-secret")
    served = client.get("/v1/tasks/sentiment").json()["revision"]
    for path in [*(tmp_path / "state" / "tasks").iterdir(), tmp_path / "state" / "revision"]:
        path.unlink()
    spec = sentiment_task(template="Opinion: {text}\nVerdict:").model_dump(mode="json")
    message = error_of(client.put("/admin/tasks/sentiment", json=spec, headers=ADMIN), 503, "unavailable")
    assert f"replica serves {served}" in message
    error_of(client.delete("/admin/tasks/sentiment", headers=ADMIN), 503, "unavailable")
    assert client.get("/v1/tasks/sentiment").json()["revision"] == served
    assert client.post("/v1/classify", json={"task": "sentiment", "input": "fine"}).status_code == 200


def test_ready_says_what_start_up_is_doing_and_when_to_retry(model_dir, tmp_path, monkeypatch):
    import threading

    import server.inprocess

    gate, loading = threading.Event(), threading.Event()

    def slow_load(*args):
        loading.set()
        assert gate.wait(30)
        return load_model(*args)

    monkeypatch.setattr(server.inprocess, "load_model", slow_load)
    with TestClient(build_app(settings(model_dir, tmp_path / "state"))) as client:
        try:
            assert loading.wait(30)
            response = client.get("/ready")
            assert response.status_code == 503 and response.headers["retry-after"] == "5"
            assert f"loading the model {str(model_dir)!r}" in response.json()["error"], response.text
        finally:
            gate.set()
        deadline = time.monotonic() + 30
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_no_route_or_dependency_runs_in_the_thread_pool():
    """FastAPI runs a plain `def` endpoint or dependency in its thread pool: a thread hop for each, on
    every request, beside the model thread's forward."""

    def calls(dependant) -> Iterator[Any]:
        yield dependant.call
        for sub in dependant.dependencies:
            yield from calls(sub)

    routes = [route for module in pkgutil.iter_modules(server.api.__path__, "server.api.")
              for router in vars(importlib.import_module(module.name)).values() if isinstance(router, APIRouter)
              for route in router.routes if isinstance(route, APIRoute)]
    sync = sorted({f"{route.path}: {call.__name__}" for route in routes for call in calls(route.dependant)
                   if not asyncio.iscoroutinefunction(call)})
    assert len(routes) > 20 and sync == []
