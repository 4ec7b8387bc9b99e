"""Does an analysis job stall classification? p99 with a job running vs idle, side by side.

    python -m bench.job_interference --duration 30 --kind isolation

One warm server (default model and task, admin enabled, data_root = the shared datasets).
Phases of closed-loop classification load: idle, with an analysis job running (on SST-2 rows,
restarted if it finishes), idle again. The idle figure pools both idle phases, so drift on a
shared machine hits both sides alike. Writes bench/results/job_interference.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from anchor_cache.arguments import default_data_root
from anchor_cache.names import cache_dir
from bench.common import RESULTS
from bench.load import load_phase, start_server, stop_server

ADMIN = {"Authorization": "Bearer bench-admin"}


def _keep_a_job_running(url: str, kind: str, stop: threading.Event, steps: list[int]) -> None:
    """Start the job, restart it whenever it ends, until `stop`; record the steps each run did."""
    body = {"kind": kind, "task": "sentiment", "data": {"path": "sst2"}, "params": {"limit": 400}}
    with httpx.Client(base_url=url, headers=ADMIN, timeout=30) as client:
        while not stop.is_set():
            started = client.post("/admin/analyses", json=body)
            started.raise_for_status()
            job_id = started.json()["id"]
            while True:
                job = client.get(f"/admin/analyses/{job_id}").json()
                if job["status"] not in ("pending", "running") or stop.wait(0.2):
                    break
            if job["status"] in ("pending", "running"):
                job = client.delete(f"/admin/analyses/{job_id}").json()
            steps.append(int((job.get("progress") or {}).get("done", 0)))
            while client.get(f"/admin/analyses/{job_id}").json()["status"] in ("pending", "running"):
                time.sleep(0.05)  # the cancelled job must end before the next one may start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=30, help="seconds per phase")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--kind", default="isolation", choices=["saliency", "isolation", "deep_layers",
                                                                  "error_diagnosis"])
    parser.add_argument("--data-root", type=Path, default=default_data_root())
    args = parser.parse_args()
    texts = [json.loads(line)["text"] for line in (args.data_root / "sst2" / "test.jsonl").read_text().splitlines()
             if line.strip()]
    work = Path(tempfile.mkdtemp(prefix="anchorserve-bench-"))
    env = {"ANCHORSERVE_CACHE_DIR": str(cache_dir()), "ANCHORSERVE_STATE_DIR": str(work / "state"),
           "ANCHORSERVE_ADMIN_API_KEY": "bench-admin", "ANCHORSERVE_DATA_ROOT": str(args.data_root)}
    try:
        proc, url, _ = start_server(env, work / "server.log")
        try:
            idle_before = asyncio.run(load_phase(url, texts, args.concurrency, args.duration))
            stop, steps = threading.Event(), []
            runner = threading.Thread(target=_keep_a_job_running, args=(url, args.kind, stop, steps))
            runner.start()
            time.sleep(2)  # let the job get going
            busy = asyncio.run(load_phase(url, texts, args.concurrency, args.duration))
            stop.set()
            runner.join()
            idle_after = asyncio.run(load_phase(url, texts, args.concurrency, args.duration))
        finally:
            stop_server(proc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    idle_p99 = (idle_before["p99_ms"] + idle_after["p99_ms"]) / 2
    result = {"kind": args.kind, "idle_before": idle_before, "with_job": busy, "idle_after": idle_after,
              "idle_p99_ms": idle_p99, "p99_ratio": busy["p99_ms"] / idle_p99, "job_steps_done": steps,
              "config": vars(args) | {"data_root": str(args.data_root)}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"job_interference-{args.kind}.json").write_text(json.dumps(result, indent=1))
    sys.stdout.write(json.dumps({k: result[k] for k in ("idle_p99_ms", "p99_ratio", "job_steps_done")}) + "\n")
    sys.stdout.write(f"p50 idle {idle_before['p50_ms']:.0f}/{idle_after['p50_ms']:.0f} ms, with job "
                     f"{busy['p50_ms']:.0f} ms; p99 idle {idle_p99:.0f} ms, with job {busy['p99_ms']:.0f} ms "
                     f"(ratio {result['p99_ratio']:.2f})\n")


if __name__ == "__main__":
    main()
