"""Server throughput, this tree against an earlier commit, side by side; and many tasks in one process.

    git worktree add /tmp/anchorserve-before 4571e87
    python -m bench.throughput --before /tmp/anchorserve-before          # bench/results/throughput.json
    python -m bench.throughput --tasks 1000 --skip-compare                # only the many-task run

Each server is its own `python -m server` process (default model and task, warm: converted model
and persisted caches present) run from its own source tree with this venv's Python; only one runs
at a time, and the phases alternate between the trees (round 1: before, after; round 2: after,
before; ...) so drifting machine load hits both alike. The load is closed-loop asyncio + httpx
from this process, SST-2 test sentences, at each concurrency. Medians over rounds are reported.

Many tasks: N SST-2 tasks (same template, demonstrations drawn per seed, so every task has its
own cache) are configured in one process (`max_tasks` raised), and the load spreads evenly over
them, against the same server serving one task. The warm start is the second start on the same
state dir (every cache persisted by the first).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from anchor_cache.arguments import default_data_root
from anchor_cache.data import read_jsonl, seed_demonstrations
from anchor_cache.names import cache_dir
from anchor_cache.task import PRESETS
from bench.common import RESULTS
from bench.load import load_phase, start_server, stop_server

HERE = Path(__file__).resolve().parents[1]


def commit_of(tree: Path) -> str:
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain"], capture_output=True, text=True)
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def task_specs(n: int, data: Path) -> list[dict]:
    template, labels = PRESETS["sst2"]
    train = read_jsonl(data / "train.jsonl", labels)
    specs = []
    for i in range(n):
        demos, _ = seed_demonstrations(train, labels, 1, seed=i)
        specs.append({"name": f"sst2-{i}", "template": template, "labels": labels,
                      "demonstrations": [d.model_dump() for d in demos]})
    return specs


def measure_tree(tree: Path, work: Path, texts: list[str], concurrency: list[int], duration: float,
                 env: dict[str, str]) -> list[dict]:
    proc, url, _ = start_server(env, work / f"{tree.name}.log", tree)
    try:
        return [asyncio.run(load_phase(url, texts, c, duration)) for c in concurrency]
    finally:
        stop_server(proc)


def compare(args: argparse.Namespace, texts: list[str], work: Path) -> dict:
    trees = {"before": args.before.resolve(), "after": HERE}
    envs = {name: {"ANCHORSERVE_CACHE_DIR": str(cache_dir()), "ANCHORSERVE_STATE_DIR": str(work / f"state-{name}"),
                   "ANCHORSERVE_DTYPE": args.dtype} for name in trees}
    for name, tree in trees.items():  # persist each tree's cache, so every measured start is warm
        stop_server(start_server(envs[name], work / f"prime-{name}.log", tree)[0])
    runs: dict[str, list[list[dict]]] = {name: [] for name in trees}
    for r in range(args.rounds):
        for name in list(trees)[:: 1 if r % 2 == 0 else -1]:
            runs[name].append(measure_tree(trees[name], work, texts, args.concurrency, args.duration, envs[name]))
    summary = {}
    for name, rounds in runs.items():
        summary[name] = {"commit": commit_of(trees[name]), "by_concurrency": {}}
        for i, c in enumerate(args.concurrency):
            phases = [rnd[i] for rnd in rounds]
            summary[name]["by_concurrency"][c] = {
                "throughput_rps": statistics.median(p["throughput_rps"] for p in phases),
                "p50_ms": statistics.median(p["p50_ms"] for p in phases),
                "p99_ms": statistics.median(p["p99_ms"] for p in phases),
                "errors": sum(sum(p["errors"].values()) for p in phases),
                "requests": sum(p["requests"] for p in phases),
                "rounds_rps": [round(p["throughput_rps"], 2) for p in phases],
            }
    return summary


def many_tasks(args: argparse.Namespace, texts: list[str], work: Path) -> dict:
    specs = task_specs(args.tasks, args.data.parent)
    config = work / "many.json"
    config.write_text(json.dumps({"tasks": specs, "max_tasks": args.tasks + 1}))
    env = {"ANCHORSERVE_CACHE_DIR": str(cache_dir()), "ANCHORSERVE_STATE_DIR": str(work / "state-many"),
           "ANCHORSERVE_CONFIG": str(config), "ANCHORSERVE_DTYPE": args.dtype}
    proc, _, cold_s = start_server(env, work / "many-cold.log")
    stop_server(proc)
    proc, url, warm_s = start_server(env, work / "many-warm.log")
    try:
        names = tuple(s["name"] for s in specs)
        c = max(args.concurrency)
        spread = [asyncio.run(load_phase(url, texts, c, args.duration, names)) for _ in range(args.rounds)]
        single = [asyncio.run(load_phase(url, texts, c, args.duration, names[:1])) for _ in range(args.rounds)]
    finally:
        stop_server(proc)
    spread_rps = statistics.median(p["throughput_rps"] for p in spread)
    single_rps = statistics.median(p["throughput_rps"] for p in single)
    return {"tasks": args.tasks, "concurrency": c, "cold_start_s": cold_s, "warm_start_s": warm_s,
            "spread_rps": spread_rps, "single_task_rps": single_rps, "ratio": spread_rps / single_rps,
            "errors": sum(sum(p["errors"].values()) for p in spread + single),
            "spread_p50_ms": statistics.median(p["p50_ms"] for p in spread)}


def markdown(result: dict) -> str:
    lines = []
    if "compare" in result:
        cmp = result["compare"]
        lines += ["| concurrency | before req/s | after req/s | after / before | before p50 ms | after p50 ms | "
                  "errors (before, after) |", "|---|---|---|---|---|---|---|"]
        for c in result["config"]["concurrency"]:
            b, a = cmp["before"]["by_concurrency"][c], cmp["after"]["by_concurrency"][c]
            lines.append(f"| {c} | {b['throughput_rps']:.1f} | {a['throughput_rps']:.1f} | "
                         f"{a['throughput_rps'] / b['throughput_rps']:.2f}× | {b['p50_ms']:.0f} | {a['p50_ms']:.0f} | "
                         f"{b['errors']}, {a['errors']} |")
    if "many_tasks" in result:
        m = result["many_tasks"]
        lines.append(f"\n{m['tasks']} tasks, concurrency {m['concurrency']}: spread evenly {m['spread_rps']:.1f} req/s "
                     f"vs one task {m['single_task_rps']:.1f} req/s ({m['ratio']:.2f}×), {m['errors']} errors; "
                     f"start cold {m['cold_start_s']:.1f} s, warm {m['warm_start_s']:.1f} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="source tree of the earlier commit (a git worktree)")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    parser.add_argument("--duration", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=0, help="also run N tasks in one process (0: skip)")
    parser.add_argument("--skip-compare", action="store_true")
    parser.add_argument("--out", type=Path, help="result file (default: bench/results/throughput.json, or "
                        "many_tasks.json with --skip-compare)")
    parser.add_argument("--dtype", default="auto", help="ANCHORSERVE_DTYPE for every server")
    parser.add_argument("--data", type=Path, default=default_data_root() / "sst2" / "test.jsonl")
    args = parser.parse_args()
    texts = [r.text for r in read_jsonl(args.data, PRESETS["sst2"][1])]
    work = Path(tempfile.mkdtemp(prefix="anchorserve-throughput-"))
    result: dict = {"config": vars(args) | {"before": str(args.before), "data": str(args.data), "out": str(args.out),
                                            "cpus": os.cpu_count(), "command": " ".join(sys.argv)}}
    try:
        if not args.skip_compare:
            if args.before is None:
                parser.error("--before is needed unless --skip-compare")
            result["compare"] = compare(args, texts, work)
        if args.tasks:
            result["many_tasks"] = many_tasks(args, texts, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    out = args.out or RESULTS / ("throughput.json" if not args.skip_compare else "many_tasks.json")
    out.write_text(json.dumps(result, indent=1))
    sys.stdout.write(markdown(result) + "\n")


if __name__ == "__main__":
    main()
