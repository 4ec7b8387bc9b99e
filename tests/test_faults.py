"""Fault injection on real server processes over one state dir: SIGKILL during a task replacement and
during β training, SIGTERM during an accepted (202) build, a truncated cache file.
After each fault the server restarts on the same state dir, and the task must be exactly its old or
its new version (spec, and probabilities equal to a reference served by that version), never a mix,
never damaged (nothing quarantined, nothing failed in /ready); a write that was acknowledged (201/202)
before the fault must survive it.

Each server is its own process running `server.__main__.main()` on a loopback port, killed with real
signals (tests/processes.py: forked from a helper that imported the server once, ~0.5 s a start; with
ANCHORSERVE_FAULT_EXEC=1, `python -m server` each time, ~4 s a start). With ANCHORSERVE_FAULT_REPORT set,
every run is also written to bench/results/faults.json.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import pytest

from tests.processes import REPO, ServerProcess

pytestmark = pytest.mark.slow

REPORT = REPO / "bench" / "results" / "faults.json"
RECORDS: list[dict[str, Any]] = []

QUERIES = ["a moving match", "dull", "the markets fell after a wonderful report on the lazy dog"]
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "a", "wonderful", "moving", "film",
         "dull", "and", "lifeless", "waste", "markets", "fell", "after", "the", "report", "match", "ended", "in",
         "draw", "who", "wrote", "hamlet"]
BIG_DEMOS = 184  # about 4020 demonstration tokens, just within max_demo_tokens (4096): a build takes ~0.3 s


def spec(name: str, template: str, labels: list[str], n: int, shift: int = 0) -> dict[str, Any]:
    demos = [{"text": " ".join(WORDS[(i * 7 + j + shift) % len(WORDS)] for j in range(10)), "label": labels[i % 2]}
             for i in range(n)]
    return {"name": name, "template": template, "labels": labels, "demonstrations": demos}


def review(name: str = "sentiment", n: int = BIG_DEMOS) -> dict[str, Any]:
    return spec(name, "Review: {text}\nSentiment:", ["Negative", "Positive"], n)


def article(name: str = "sentiment", n: int = BIG_DEMOS) -> dict[str, Any]:
    return spec(name, "Article: {text}\nAnswer:", ["Sports", "Business"], n, shift=3)


def same_probs(a: list[dict[str, float]], b: list[dict[str, float]], tol: float = 1e-5) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(math.isclose(x[k], y[k], abs_tol=tol) for k in x)
        for x, y in zip(a, b, strict=True)
    )


def record(scenario: str, delay_ms: float | None, acknowledged: bool | None, outcome: str, **extra: Any) -> None:
    RECORDS.append({"scenario": scenario, "delay_ms": delay_ms, "acknowledged": acknowledged, "outcome": outcome}
                   | extra)


@pytest.fixture(scope="module", autouse=True)
def fault_report():
    """Writes bench/results/faults.json after the module when ANCHORSERVE_FAULT_REPORT is set."""
    RECORDS.clear()
    start = time.perf_counter()
    yield
    if not os.environ.get("ANCHORSERVE_FAULT_REPORT"):
        return
    outcomes = [r["outcome"] for r in RECORDS]
    totals = {"runs": len(RECORDS), "old": outcomes.count("old"), "new": outcomes.count("new"),
              "rebuilt": outcomes.count("rebuilt"), "mixed": outcomes.count("mixed"),
              "corrupt": outcomes.count("corrupt"),
              "acknowledged_but_lost": sum(1 for r in RECORDS if r["acknowledged"] and r["outcome"] == "old")}
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps({
        "what": "tests/test_faults.py: real server processes (tiny Llama, CPU, 1 thread) faulted mid-write, then "
                "restarted on the same state dir; outcome = which version of the task serves after the restart "
                "(old/new), acknowledged = the write was answered 201/202 (β: its job said succeeded) before the fault",
        "launcher": "python -m server" if os.environ.get("ANCHORSERVE_FAULT_EXEC") else "fork of an imported server",
        "seconds": round(time.perf_counter() - start, 1), "totals": totals, "runs": RECORDS,
    }, indent=1) + "\n")


@pytest.fixture()
def servers(tmp_path, long_model, launch):
    """servers(name, tasks, **settings) -> a ServerProcess (not started); every process is killed at teardown."""
    made: list[ServerProcess] = []

    def make(name: str, tasks: list[dict[str, Any]], **settings: Any) -> ServerProcess:
        root = tmp_path / name
        root.mkdir()
        made.append(ServerProcess(launch, root, long_model, tasks, **settings))
        return made[-1]

    yield make
    for server in made:
        server.close()


def assert_clean(server: ServerProcess, ready: dict[str, Any], tasks: set[str]) -> None:
    """Nothing failed, nothing quarantined."""
    assert ready["failed"] == {}, ready
    assert set(ready["tasks"]) == tasks, ready
    assert not list((server.state_dir / "quarantine").glob("*")), "a file was quarantined"


# --- 1. SIGKILL during a task replacement ---------------------------------------------------------------

REPLACE_DELAYS_MS = [0, 5, 20, 50, 100, 200, 300, 400, 500, 600, 800, 1000]


def state_at_kill(server: ServerProcess, target: dict[str, Any], target_key: str) -> str:
    """How far the write had got on disk when the process died (read before the restart)."""
    current = server.state_dir / "tasks" / "sentiment.json"
    stored = json.loads(current.read_text()).get("spec") if current.is_file() else None
    if stored is None or stored["template"] != target["template"]:
        return "not stored"
    built = (server.state_dir / "caches" / f"{target_key}.safetensors").is_file()
    return "stored, cache saved" if built else "stored, not built"


def test_sigkill_during_replacement_leaves_the_old_or_the_new_version(servers):
    """The task alternates between two versions, each ~4000 demonstration tokens; each PUT is followed by
    SIGKILL after a delay, then a restart on the same state dir."""
    versions = {"review": review(), "article": article()}
    server = servers("replace", [review(), article("reference-article")])
    ready = server.start()
    assert set(ready["tasks"]) == {"sentiment", "reference-article"}
    refs = {"review": (server.task("sentiment"), server.classify("sentiment", QUERIES)),
            "article": (server.task("reference-article"), server.classify("reference-article", QUERIES))}
    assert not same_probs(refs["review"][1], refs["article"][1])
    assert server.delete("/admin/tasks/reference-article").status_code == 200  # a tombstone: not built again

    def version_served() -> str:
        info, probs = server.task("sentiment"), server.classify("sentiment", QUERIES)
        matches = [v for v, (ref, ref_probs) in refs.items()
                   if (info["template"], info["labels"]) == (ref["template"], ref["labels"])
                   and info["cache_hash"] == ref["cache_hash"] and same_probs(probs, ref_probs)]
        assert len(matches) == 1, f"served a mix of versions: {info['template']!r} {info['labels']} {probs}"
        return matches[0]

    current = "review"
    for delay_ms in REPLACE_DELAYS_MS:
        target = "article" if current == "review" else "review"
        # Caches are derivable: dropping the target's file (not served now) makes the PUT really build it.
        (server.state_dir / "caches" / f"{refs[target][0]['cache_hash']}.safetensors").unlink(missing_ok=True)
        request = server.send_raw("PUT", "/admin/tasks/sentiment", versions[target])
        request.read_until(request.sent_at + delay_ms / 1000)
        server.kill()
        request.read_for(2)
        request.close()
        assert request.status in (None, 201, 202), request.data[:500]
        acknowledged = request.status is not None
        on_disk = state_at_kill(server, versions[target], refs[target][0]["cache_hash"])
        assert_clean(server, server.start(), {"sentiment"})
        served = version_served()
        outcome = "new" if served == target else "old"
        record("sigkill_replace", delay_ms, acknowledged, outcome, status=request.status, on_disk_at_kill=on_disk)
        if acknowledged:
            assert outcome == "new", f"PUT answered {request.status} before SIGKILL at {delay_ms} ms, but was lost"
        current = served


# --- 2. SIGKILL during β training ---------------------------------------------------------------------

TRAIN_DELAYS_MS = [0, 100, 300, 600, 900, 1200, 1500]
TRAINING = {
    "examples": [{"text": " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(8)),
                  "label": ["Negative", "Positive"][i % 2]} for i in range(24)],
    "epochs": 12, "lr": 0.05, "seed": 7,  # ~1 s of training
}


def test_sigkill_during_reweighting_leaves_no_beta_or_a_complete_one(servers):
    server = servers("reweight", [review(n=4)])
    assert_clean(server, server.start(), {"sentiment"})
    plain = server.classify("sentiment", QUERIES)
    with_beta: list[list[dict[str, float]]] = []  # predictions served with a restored β, checked at the end

    def served_beta() -> tuple[float | None, list[dict[str, float]]]:
        info, probs = server.task("sentiment"), server.classify("sentiment", QUERIES)
        assert "lost" not in (info["reweighting"] or {}), info["reweighting"]
        if not info["reweighted"]:
            assert info["reweighting"] is None and same_probs(probs, plain)
            return None, probs
        epochs = TRAINING["epochs"]
        assert info["reweighting"]["epochs"] == epochs and len(info["reweighting"]["epoch_losses"]) == epochs
        with_beta.append(probs)
        return info["reweighting"]["trained_at"], probs

    trained_at = None
    for delay_ms in [*TRAIN_DELAYS_MS, "finished"]:
        request = server.send_raw("POST", "/admin/tasks/sentiment/reweighting", TRAINING)
        finished, before = False, None
        if delay_ms == "finished":  # wait for the job, note the predictions, then SIGKILL
            request.read_for(10)
            job = request.json()["job"]
            deadline = time.monotonic() + 60
            while (status := server.get(f"/admin/jobs/{job}").json())["status"] in ("pending", "running"):
                assert time.monotonic() < deadline, status
                time.sleep(0.05)
            assert status["status"] == "succeeded", status
            finished, before = True, server.classify("sentiment", QUERIES)
        else:
            request.read_until(request.sent_at + delay_ms / 1000)
            if request.status == 202:  # did the job finish before the kill? (it persists β before it says so)
                job_status = server.get(f"/admin/jobs/{request.json()['job']}").json()
                finished = job_status["status"] == "succeeded"
        server.kill()
        request.read_for(2)
        request.close()
        assert request.status in (None, 202), request.data[:500]
        assert_clean(server, server.start(), {"sentiment"})
        previous, (trained_at, probs) = trained_at, served_beta()
        outcome = "old" if trained_at == previous else "new"
        # β makes no promise at 202 (training is not resumed after a crash): it is acknowledged once its job
        # says succeeded, which happens only after β was saved.
        record("sigkill_reweighting", None if delay_ms == "finished" else delay_ms, finished, outcome,
               status=request.status)
        if finished:
            assert outcome == "new", f"β training had finished before SIGKILL at {delay_ms} ms but was lost"
        if before is not None:
            assert same_probs(probs, before), "the restored β predicts differently from the β served before"
    # Every β served after a restart is the one training produces (training is deterministic).
    assert with_beta and all(same_probs(probs, with_beta[-1]) for probs in with_beta)


# --- 3. SIGTERM during an accepted build ----------------------------------------------------------------


def test_sigterm_during_an_accepted_build_keeps_the_change(servers):
    server = servers("sigterm", [review(n=4)], admin_sync_wait_s=0)
    assert_clean(server, server.start(), {"sentiment"})
    replace = server.send_raw("PUT", "/admin/tasks/sentiment", article())
    create = server.send_raw("POST", "/admin/tasks", review("created"))
    for request in replace, create:
        request.read_for(10)
        request.close()
        assert request.status == 202, request.data[:500]
    jobs = [server.get(f"/admin/jobs/{r.json()['job']}").json()["status"] for r in (replace, create)]
    if all(s == "succeeded" for s in jobs):  # two ~0.3 s builds queue on one model thread: only on a slow host
        pytest.skip(f"both builds finished before SIGTERM ({jobs}): the scenario was not exercised")
    assert server.terminate() in (0, -15)
    ready = server.start()
    replaced = server.task("sentiment")["template"] == article()["template"]
    created = "created" in ready["tasks"]
    record("sigterm_accepted_build", None, True, "new" if replaced else "old", task="sentiment (PUT)",
           job_status_at_sigterm=jobs[0])
    record("sigterm_accepted_build", None, True, "new" if created else "old", task="created (POST)",
           job_status_at_sigterm=jobs[1])
    assert replaced, "an accepted (202) replacement was lost by a graceful SIGTERM"
    assert created, "an accepted (202) creation was lost by a graceful SIGTERM"
    assert_clean(server, ready, {"sentiment", "created"})


# --- 4. a truncated cache file ----------------------------------------------------------------------------


def test_truncated_cache_is_quarantined_and_rebuilt(servers):
    server = servers("truncate", [review(n=4), article("topic", n=4)])
    assert_clean(server, server.start(), {"sentiment", "topic"})
    refs = {name: (server.task(name), server.classify(name, QUERIES)) for name in ("sentiment", "topic")}
    assert server.terminate() in (0, -15)
    damaged = server.state_dir / "caches" / f"{refs['topic'][0]['cache_hash']}.safetensors"
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    ready = server.start()
    assert ready["failed"] == {} and set(ready["tasks"]) == {"sentiment", "topic"}, ready
    for name, (info, probs) in refs.items():
        now = server.task(name)
        assert now["cache_hash"] == info["cache_hash"] and same_probs(server.classify(name, QUERIES), probs)
        assert now["loaded_from_disk"] is (name == "sentiment"), now
    quarantined = [p.name for p in (server.state_dir / "quarantine").iterdir()]
    assert len(quarantined) == 1 and quarantined[0].startswith(damaged.name + "."), quarantined
    assert (server.state_dir / "quarantine" / quarantined[0]).read_bytes() == data[: len(data) // 2]
    assert damaged.read_bytes() != data[: len(data) // 2]  # rebuilt in place
    record("truncated_cache", None, None, "rebuilt", task="topic")


# --- found while building these tests -------------------------------------------------------------------


def test_a_task_longer_than_the_model_positions_is_refused(serve):
    """conftest's tiny Llama has 512 positions; the default max_demo_tokens (4096) admits ~4000 tokens."""
    client = serve(admin_api_key="admin-secret")
    response = client.post("/admin/tasks", json=review("long"), headers={"Authorization": "Bearer admin-secret"})
    if response.status_code == 201:
        classify = client.post("/v1/classify", json={"task": "long", "input": "dull"})
        pytest.fail(f"accepted (201), then every classify fails: {classify.status_code} {classify.json()['error']}")
    assert response.status_code == 422, response.text
