"""A CPU-bound neighbour that arrives and leaves while the server is under load: req/s in each
period and torch's thread count second by second, this tree against an earlier commit.

    git worktree add /tmp/anchorserve-before <rev>
    python -m bench.neighbours --before /tmp/anchorserve-before   # bench/results/neighbours.json, prints markdown

Each tree in turn (bench/serving.py's servers: the default model in bfloat16, the built-in task
without its pool, one process per tree, `--before-env` / `--after-env` as there) serves
`--concurrency` wrk clients through three periods back to back: quiet (`--quiet`), beside
`--neighbours` busy loops (`--busy`), and quiet again after they are killed (`--after-busy`).
`anchorserve_torch_threads` is read from /metrics every second (null for a tree that has no such
gauge); the server's log lines about its thread count are kept with the result.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from anchor_cache.arguments import default_data_root
from anchor_cache.models import DEFAULT_MODEL
from bench.common import RESULTS, write_result
from bench.load import free_port
from bench.serving import (
    HERE,
    Setup,
    key_values,
    request_bodies,
    run_wrk,
    server_env,
    start_server,
    stop_server,
    task_config,
    warm_up,
)
from bench.throughput import commit_of

THREADS = "anchorserve_torch_threads"


def torch_threads(client: httpx.Client) -> float | None:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == THREADS:
                return sample.value
    return None


def watch_threads(url: str, stop: threading.Event, began: float, timeline: list[tuple[float, float | None]]) -> None:
    """(seconds since `began`, the gauge) every second until `stop`."""
    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.wait(1.0):
            try:
                threads = torch_threads(client)
            except httpx.HTTPError:  # a slow /metrics leaves a gap in the timeline, not an end to it
                threads = None
            timeline.append((round(time.monotonic() - began, 1), threads))


def run_tree(tree: Path, env: dict[str, str], log: Path, bodies: Path, texts: list[str],
             args: argparse.Namespace) -> dict:
    proc, url, _ = start_server(tree, env, log, args.ready_timeout)
    timeline: list[tuple[float, float | None]] = []
    periods = {}
    stop = threading.Event()
    watcher = None
    try:
        warm_up(url, texts, bodies, args.concurrency, 1, 60, 2)
        began = time.monotonic()
        watcher = threading.Thread(target=watch_threads, args=(url, stop, began, timeline))
        watcher.start()
        for name, seconds in (("quiet", args.quiet), ("busy", args.busy), ("after_busy", args.after_busy)):
            # Each in a session of its own, as another tenant's job would be: with the kernel's autogroups,
            # busy loops that share one session share one CPU's worth of time between them.
            loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
                     for _ in range(args.neighbours)] if name == "busy" else []
            try:
                w = run_wrk(url, bodies, args.concurrency, seconds, 1, 60)
            finally:
                for loop in loops:
                    loop.kill()
                    loop.wait()
            ok = w["requests"] - w["errors"]["status"]
            periods[name] = {"seconds": seconds, "rps": ok / (w["duration_us"] / 1e6),
                             "p99_ms": w["latency_us"]["p99"] / 1000, "errors": sum(w["errors"].values())}
            sys.stderr.write(f"{tree.name} {name}: {periods[name]['rps']:.1f} req/s\n")
    finally:
        stop.set()
        if watcher is not None:
            watcher.join()
        stop_server(proc, 30)
    changes = [line.split(": ", 1)[1] for line in log.read_text().splitlines() if "torch threads" in line]
    return {"commit": commit_of(tree), "periods": periods, "threads": timeline, "changes": changes}


def markdown(result: dict) -> str:
    lines = ["| tree | quiet req/s | beside the neighbours | after they left | thread changes |",
             "|---|---|---|---|---|"]
    for name, run in result["trees"].items():
        p = run["periods"]
        lines.append(f"| {name} ({run['commit']}) | {p['quiet']['rps']:.1f} | {p['busy']['rps']:.1f} | "
                     f"{p['after_busy']['rps']:.1f} | {'; '.join(run['changes']) or 'none'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="source tree of the earlier commit (a git worktree)")
    parser.add_argument("--after", type=Path, default=HERE)
    parser.add_argument("--before-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--after-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--neighbours", type=int, default=2)
    parser.add_argument("--quiet", type=float, default=15, help="seconds of load before the neighbours come")
    parser.add_argument("--busy", type=float, default=20, help="seconds of load beside them")
    parser.add_argument("--after-busy", type=float, default=45, help="seconds of load after they left")
    parser.add_argument("--ready-timeout", type=float, default=600)
    parser.add_argument("--data", type=Path, default=default_data_root() / "sst2" / "test.jsonl")
    parser.add_argument("--out", type=Path, default=RESULTS / "neighbours.json")
    args = parser.parse_args()
    trees = ({"before": args.before.resolve()} if args.before else {}) | {"after": args.after.resolve()}
    extra = {"before": key_values(args.before_env), "after": key_values(args.after_env)}
    work = Path(tempfile.mkdtemp(prefix="anchorserve-neighbours-"))
    texts, bodies = request_bodies(args.data, 200, work)
    config = task_config(work / "task.yaml")
    setup = Setup("default", DEFAULT_MODEL, "bfloat16", [args.concurrency])
    result = {"config": {k: str(v) for k, v in vars(args).items()} | {"command": " ".join(sys.argv)}, "trees": {}}
    try:
        for name, tree in trees.items():
            env = server_env(tree, setup, work / f"state-{name}", config, free_port(), work / f"site-{name}",
                             extra[name])
            result["trees"][name] = run_tree(tree, env, work / f"{name}.log", bodies, texts, args)
    except BaseException:
        sys.stderr.write(f"failed: server logs kept in {work}\n")
        raise
    shutil.rmtree(work, ignore_errors=True)
    write_result(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
