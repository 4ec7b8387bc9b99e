"""Admin input that cannot stall classification, cancellable β jobs and a bounded exit.

    python -m bench.admin_pressure                     # writes bench/results/admin_pressure.json

One `python -m server` (this tree, CPU, float32, the tiny random Llama of tests/conftest.py with the
built-in "sentiment" task, an admin key, `shutdown_timeout_s` 10) on a free loopback port:
1. refusals: one create with 6,000 demonstrations and one with a 20,000-row pool; status and ms;
2. classification beside admin pressure: a closed loop of single-input classify requests from
   `--clients` threads for `--seconds`, first alone, then beside bursts of `--creates` concurrent
   oversized creates (6,000 demonstrations each, 424 KB), a burst `--gap` s after the last one
   answered, then beside a flood (the next burst at once); p50, p99 and max latency per phase,
   and how many creates were refused meanwhile;
3. cancel: a β job on inline examples (long enough to still run), DELETE /admin/jobs/{id} once it
   runs, then the seconds until its status reads "cancelled";
4. SIGTERM with a β job running: the seconds until the process exits, and its exit code.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from bench.common import RESULTS
from bench.reliability import REPO, serve
from tests.conftest import save_tiny_model

KEY = "bench-admin-key"
ADMIN = {"Authorization": f"Bearer {KEY}"}
WORDS = ["a", "wonderful", "dull", "film", "report", "match", "markets", "fell", "moving", "waste"]


def spec(name: str, demos: int = 4, pool: int = 0) -> dict:
    rows = [{"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(6)), "label": ("Negative", "Positive")[i % 2]}
            for i in range(max(demos, pool))]
    body = {"name": name, "template": "Review: {text}\nSentiment:", "labels": ["Negative", "Positive"],
            "demonstrations": rows[:demos]}
    if pool:
        body["examples"] = rows[:pool]
    return body


def timed_post(client: httpx.Client, path: str, body: dict) -> tuple[int, float]:
    start = time.perf_counter()
    status = client.post(path, json=body, headers=ADMIN).status_code
    return status, 1000 * (time.perf_counter() - start)


def classify_loop(url: str, seconds: float, clients: int) -> list[float]:
    """Latencies (ms) of single-input classify requests, `clients` closed loops for `seconds`."""
    latencies: list[float] = []
    stop = time.monotonic() + seconds

    def loop() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while time.monotonic() < stop:
                start = time.perf_counter()
                response = client.post("/v1/classify", json={"input": "a moving match"})
                latencies.append(1000 * (time.perf_counter() - start) if response.status_code == 200 else float("inf"))

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def summary(latencies: list[float]) -> dict:
    finite = [x for x in latencies if x != float("inf")]
    return {"requests": len(latencies), "failed": len(latencies) - len(finite),
            "p50_ms": float(np.percentile(finite, 50)), "p99_ms": float(np.percentile(finite, 99)),
            "max_ms": max(finite)}


def pressure(url: str, seconds: float, clients: int, creates: int, gap_s: float) -> dict:
    """Classification while bursts of `creates` concurrent oversized creates go out, the next
    burst `gap_s` after the last one answered (0: a sustained flood)."""
    stop, statuses = threading.Event(), []
    big = spec("oversized", demos=6000)

    def one(client: httpx.Client) -> None:
        statuses.append(timed_post(client, "/admin/tasks", big))

    def bursts() -> None:
        clients_ = [httpx.Client(base_url=url, timeout=120) for _ in range(creates)]
        try:
            while not stop.is_set():
                burst = [threading.Thread(target=one, args=(c,)) for c in clients_]
                for t in burst:
                    t.start()
                for t in burst:
                    t.join()
                stop.wait(gap_s)
        finally:
            for c in clients_:
                c.close()

    sender = threading.Thread(target=bursts)
    sender.start()
    try:
        latencies = classify_loop(url, seconds, clients)
    finally:
        stop.set()
        sender.join()
    return {"classify": summary(latencies), "gap_s": gap_s, "creates": len(statuses),
            "create_statuses": sorted({s for s, _ in statuses}),
            "create_p50_ms": statistics.median(ms for _, ms in statuses) if statuses else None,
            "create_bytes": len(json.dumps(big))}


def start_job(client: httpx.Client, examples: int, epochs: int) -> str:
    rows = spec("unused", pool=examples)["examples"]
    response = client.post("/admin/tasks/sentiment/reweighting", json={"examples": rows, "epochs": epochs},
                           headers=ADMIN)
    assert response.status_code == 202, response.text
    job = response.json()["job"]
    while client.get(f"/admin/jobs/{job}", headers=ADMIN).json()["status"] != "running":
        time.sleep(0.02)
    return job


def cancel(url: str, examples: int, epochs: int) -> dict:
    with httpx.Client(base_url=url, timeout=60) as client:
        job = start_job(client, examples, epochs)
        time.sleep(0.5)  # well inside the work, past the first rows
        start = time.perf_counter()
        client.delete(f"/admin/jobs/{job}", headers=ADMIN)
        while (status := client.get(f"/admin/jobs/{job}", headers=ADMIN).json()["status"]) == "running":
            time.sleep(0.02)
        return {"status": status, "seconds": time.perf_counter() - start}


def sigterm(server, examples: int, epochs: int) -> dict:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        start_job(client, examples, epochs)
    time.sleep(0.5)
    start = time.perf_counter()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(timeout=120)
    return {"exit_code": code, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15, help="per classification phase")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--creates", type=int, default=6, help="oversized creates sent at once")
    parser.add_argument("--gap", type=float, default=1.0, help="seconds between bursts of creates")
    parser.add_argument("--examples", type=int, default=256, help="β job rows")
    parser.add_argument("--epochs", type=int, default=200, help="β job epochs (long enough to still run)")
    parser.add_argument("--out", type=Path, default=RESULTS / "admin_pressure.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="anchorserve-admin-"))
    model = save_tiny_model("llama", work / "model")
    extra = {"ANCHORSERVE_ADMIN_API_KEY": KEY, "ANCHORSERVE_SHUTDOWN_TIMEOUT_S": "10"}
    result: dict = {"command": " ".join(sys.argv), "shutdown_timeout_s": 10}
    with serve(REPO, model, work, "admin", extra) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        result["refusals"] = {
            "6000_demonstrations": dict(zip(("status", "ms"), timed_post(client, "/admin/tasks",
                                                                         spec("many", demos=6000)), strict=True)),
            "20000_row_pool": dict(zip(("status", "ms"), timed_post(client, "/admin/tasks",
                                                                    spec("pool", pool=20000)), strict=True)),
        }
        result["alone"] = summary(classify_loop(server.url, args.seconds, args.clients))
        result["beside_bursts"] = pressure(server.url, args.seconds, args.clients, args.creates, args.gap)
        result["beside_flood"] = pressure(server.url, args.seconds, args.clients, args.creates, 0)
        result["cancel"] = cancel(server.url, args.examples, args.epochs)
        result["sigterm_with_job"] = sigterm(server, args.examples, args.epochs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    sys.stdout.write(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
