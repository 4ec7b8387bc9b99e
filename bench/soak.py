"""Memory under sustained load: the server's resident memory sampled while wrk keeps 32 clients busy.

    python -m bench.soak                              # default model, bf16, 32 clients, 600 s: bench/results/soak.json
    python -m bench.soak --duration 60 --idle 20      # a quick look

The server is this tree's `python -m server` with the built-in task (without its pool, as in
bench/serving.py), one request per SST-2 sentence from wrk. RSS is the sum of VmRSS over the
server's process group (every process it spawned), sampled every `--every` seconds under load and
then for `--idle` seconds with no load, to see whether what grew under load is kept or returned.
A plateau shows as a small slope over the second half of the run; a leak as a slope that does not
fall.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from anchor_cache.arguments import default_data_root
from anchor_cache.names import DEFAULT_MODEL
from bench.common import RESULTS
from bench.load import free_port
from bench.serving import Setup, group_members, run_wrk, server_env, start_server, stop_server, task_config

HERE = Path(__file__).resolve().parents[1]


def group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in the group, in MB."""
    total = 0
    for pid in group_members(pgid):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:  # it exited while we looked
            continue
        total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total / 1024


def slope_mb_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of RSS over time."""
    t, rss = np.array(samples).T
    return float(np.polyfit(t / 60, rss, 1)[0]) if len(samples) > 2 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=600, help="seconds under load")
    parser.add_argument("--idle", type=float, default=60, help="seconds sampled after the load stops")
    parser.add_argument("--every", type=float, default=5, help="seconds between samples")
    parser.add_argument("--data", type=Path, default=default_data_root() / "sst2" / "test.jsonl")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="anchorserve-soak-"))
    texts = [json.loads(line)["text"] for line in args.data.read_text().splitlines() if line.strip()][:200]
    bodies = work / "bodies.jsonl"
    bodies.write_text("".join(json.dumps({"input": t}, ensure_ascii=True) + "\n" for t in texts))
    setup = Setup("soak", args.model, args.dtype, [args.clients])
    env = server_env(HERE, setup, work / "state", task_config(work / "task.yaml"), free_port(), work / "site", {})
    proc, url, ready_s = start_server(HERE, env, work / "server.log", 600)
    pgid = os.getpgid(proc.pid)
    samples: list[tuple[float, float]] = [(0.0, group_rss_mb(pgid))]
    wrk: dict = {}
    load = threading.Thread(target=lambda: wrk.update(run_wrk(url, bodies, args.clients, args.duration, 1, 60)))
    start = time.monotonic()
    try:
        load.start()
        while load.is_alive():
            load.join(args.every)
            samples.append((time.monotonic() - start, group_rss_mb(pgid)))
        loaded_until = samples[-1][0]
        while time.monotonic() - start < loaded_until + args.idle:
            time.sleep(args.every)
            samples.append((time.monotonic() - start, group_rss_mb(pgid)))
    finally:
        stop_server(proc, 30)
    under_load = [s for s in samples if s[0] <= loaded_until]
    second_half = [s for s in under_load if s[0] >= loaded_until / 2]
    summary = {
        "requests": wrk.get("requests"), "errors": wrk.get("errors"),
        "req_per_s": wrk["requests"] / (wrk["duration_us"] / 1e6) if wrk.get("requests") else None,
        "rss_mb_start": samples[0][1], "rss_mb_after_1_min": next((r for t, r in samples if t >= 60), None),
        "rss_mb_end_of_load": under_load[-1][1], "rss_mb_max": max(r for _, r in samples),
        "rss_mb_after_idle": samples[-1][1],
        "slope_mb_per_min_first_half": slope_mb_per_min([s for s in under_load if s[0] < loaded_until / 2]),
        "slope_mb_per_min_second_half": slope_mb_per_min(second_half),
    }
    result = {"config": vars(args) | {"data": str(args.data), "out": str(args.out), "ready_s": ready_s},
              "summary": summary, "samples": samples}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))  # noqa: T201


if __name__ == "__main__":
    main()
