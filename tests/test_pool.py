"""A task's `examples` pool: β learned from it after start-up and on admin writes, stored once; and the
engine's Python API answering exactly what the server answers for the same task (β, calibration)."""

from __future__ import annotations

import logging
import math
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from anchor_cache import Classifier, Demonstration, load_model
from anchor_cache.blobs import find_beta
from anchor_cache.registry import TaskRegistry
from anchor_cache.reweighting import load_beta, pool_rows
from server.store.local import LocalStore
from tests.conftest import ADMIN, QUERIES, sentiment_task, wait_finished, wait_reweighted

POOL = [Demonstration(text=t, label=label) for t, label in [
    ("a warm and moving story", "Positive"), ("the fox was wonderful", "Positive"), ("a moving report", "Positive"),
    ("dull from the start", "Negative"), ("lifeless and a waste", "Negative"), ("the markets fell", "Negative"),
    ("dull and lifeless, a waste", "Negative"),  # a demonstration of sentiment_task(): dropped from training
]]


@pytest.fixture(scope="module")
def server_lm(model_dir):
    """The model the `serve` fixture's servers load, loaded here the same way."""
    return load_model(str(model_dir), device="cpu", dtype="float32")


def pooled(**overrides):
    return sentiment_task(**({"examples": POOL} | overrides))


def probs_of(item: dict) -> dict[str, float]:
    """The per-label probabilities of one response item."""
    return item["label_probs"] if "label_probs" in item else item["probs"]


def test_pool_rows_drop_demonstrations(tiny_lm):
    texts, labels = pool_rows(Classifier(tiny_lm, pooled()))
    assert len(texts) == len(POOL) - 1 and "dull and lifeless, a waste" not in texts
    assert labels == [1, 1, 1, 0, 0, 0]


def test_beta_is_learned_from_the_pool_after_start_and_only_loaded_after(serve, tmp_path):
    first = serve(tasks=[pooled()])
    info = wait_reweighted(first, "sentiment")
    assert info["reweighting"]["source"] == "examples"
    assert info["reweighting"]["train_examples"] == len(POOL) - 1
    first.__exit__(None, None, None)
    again = serve(tasks=[pooled()]).get("/v1/tasks/sentiment").json()
    assert again["reweighting"] == info["reweighting"]  # loaded at start, not learned again
    changed = serve(tasks=[pooled(examples=POOL[1:])])  # serves the old β until the new pool's is learned
    deadline = time.monotonic() + 120
    while changed.get("/v1/tasks/sentiment").json()["reweighting"]["pool"] == info["reweighting"]["pool"]:
        assert time.monotonic() < deadline, "the new pool's β was never learned"
        time.sleep(0.02)


@pytest.fixture
def held_at_first_step(monkeypatch):
    """β learning from a pool stops after its first step until `release` is set (set at teardown)."""
    first_step, release = threading.Event(), threading.Event()
    learn = TaskRegistry.learn_pool_beta

    def held(self, served, should_stop=None, on_step=None):
        def step(done: int, total: int) -> None:
            on_step(done, total)
            if done == 1:
                first_step.set()
                assert release.wait(60)

        return learn(self, served, should_stop, step)

    monkeypatch.setattr(TaskRegistry, "learn_pool_beta", held)
    yield first_step, release
    release.set()


def test_a_task_serves_at_once_while_its_pool_beta_is_learned(serve, held_at_first_step, caplog, server_lm):
    """Start-up never waits for β: the task answers without it, with its calibration, until the job
    swaps it in; meanwhile the task's info, /ready and the log say how far the job got."""
    first_step, release = held_at_first_step
    spec = pooled(calibrate=True)
    caplog.set_level(logging.INFO, logger="anchor_cache.registry")
    client = serve(tasks=[spec], admin_api_key="admin-secret")  # ready while the job waits
    assert first_step.wait(60)
    info = client.get("/v1/tasks/sentiment").json()
    assert not info["reweighted"]
    learning = info["learning"]
    assert learning["step"] == "learn_pool_beta" and learning["progress"]["done"] == 1
    assert learning["progress"]["total"] > 1
    assert client.get(f"/admin/jobs/{learning['job']}", headers=ADMIN).json()["status"] == "running"
    assert client.get("/ready").json()["learning"] == {"sentiment": learning}
    assert "task sentiment: learning β, step 1/" in caplog.text
    plain = client.post("/v1/classify", json={"task": "sentiment", "input": QUERIES}).json()["data"]
    calibrated = Classifier(server_lm, spec).classify(QUERIES)  # no β, calibrated
    for item, prediction in zip(plain, calibrated, strict=True):
        for label, p in probs_of(item).items():
            assert math.isclose(p, prediction.probs[label], abs_tol=1e-5), (item, prediction)
    release.set()
    info = wait_reweighted(client, "sentiment")
    assert info["learning"] is None and client.get("/ready").json()["learning"] == {}
    learned = client.post("/v1/classify", json={"task": "sentiment", "input": QUERIES}).json()["data"]
    assert [d["probs"] for d in learned] != [d["probs"] for d in plain]


def test_a_replaced_task_shows_no_job_of_its_old_version(serve, held_at_first_step):
    """The old version's β job may still run after a replacement without a pool: neither the new
    version's info nor /ready shows it."""
    first_step, _ = held_at_first_step
    client = serve(tasks=[pooled()], admin_api_key="admin-secret")
    assert first_step.wait(60)
    assert client.get("/v1/tasks/sentiment").json()["learning"]["step"] == "learn_pool_beta"
    replaced = client.put("/admin/tasks/sentiment", json=sentiment_task().model_dump(mode="json"), headers=ADMIN)
    assert replaced.status_code in (200, 201), replaced.text
    info = client.get("/v1/tasks/sentiment").json()
    assert info["revision"] > 1 and info["learning"] is None
    assert client.get("/ready").json()["learning"] == {}


def test_an_admin_write_with_a_pool_learns_beta_in_its_job(serve):
    client = serve(admin_api_key="admin-secret", admin_sync_wait_s=0)
    answer = client.post("/admin/tasks", json=pooled(name="pooled").model_dump(mode="json"), headers=ADMIN)
    assert answer.status_code == 202, answer.text
    job = wait_finished(client, f"/admin/jobs/{answer.json()['job']}")
    assert job["status"] == "succeeded", job
    assert job["progress"]["done"] == job["progress"]["total"] > 0
    assert job["result"]["reweighted"] and job["result"]["reweighting"]["source"] == "examples"
    assert client.get("/v1/tasks/pooled").json()["reweighted"]


@pytest.mark.parametrize(("method", "calibrate"), [("hidden_anchor", False), ("hidden_anchor", True),
                                                    ("linear_head", False), ("many_shot", True)])
def test_the_python_api_answers_what_the_server_answers(serve, tmp_path, server_lm, method, calibrate):
    """A linear head is fitted under the task's pool β, and a many-shot task learns β and calibrates,
    on the server as in the engine (that the group bias reaches every path, β training's cache
    extension included, is test_heads.py's)."""
    spec = pooled(calibrate=calibrate, method=method)
    client = serve(tasks=[spec])
    wait_reweighted(client, "sentiment")
    served = client.post("/v1/classify", json={"task": "sentiment", "input": QUERIES}).json()["data"]
    key = client.get("/v1/tasks/sentiment").json()["cache_hash"]
    beta, _ = find_beta(LocalStore(tmp_path / "state"), key, server_lm)
    local = Classifier(server_lm, spec, beta=beta).classify(QUERIES)
    for item, prediction in zip(served, local, strict=True):
        assert item["label"] == prediction.label
        for label, p in probs_of(item).items():
            assert math.isclose(p, prediction.probs[label], abs_tol=1e-5), (item, prediction)
    if calibrate:
        assert all(p.raw_probs is not None and p.raw_probs != p.probs for p in local)
    plain = Classifier(server_lm, spec).classify(QUERIES)
    assert [p.probs for p in plain] != [p.probs for p in local]  # β (and calibration) changed the answer


def test_load_beta_reads_what_reweight_wrote(tmp_path):
    beta = torch.arange(6, dtype=torch.float32).reshape(1, 2, 3)
    save_file({"beta": beta}, str(tmp_path / "beta.safetensors"))
    assert torch.equal(load_beta(tmp_path), beta) and torch.equal(load_beta(tmp_path / "beta.safetensors"), beta)
