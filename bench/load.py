"""Server benchmarks on loopback: load at several concurrencies, single-request overhead, start-up time.

    python -m bench.load                       # writes bench/results/load.json, prints markdown
    python -m bench.load --duration 20 --concurrency 1,8   # a quicker look

The server runs as its own process (`python -m server`, default model and task); the load comes
from this process with asyncio + httpx, closed-loop: each of C workers sends its next request as
soon as the previous one answers. Inputs are SST-2 test sentences.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from anchor_cache.arguments import default_data_root
from anchor_cache.names import cache_dir
from bench.common import RESULTS, wait_ready


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Packages of this venv that make the server faster but that an older tree may not require.
SPEED_PACKAGES = ("uvloop", "httptools")
READY_TIMEOUT_S = 600  # the default model's first start converts its GGUF


def hide_unrequired(tree: Path, into: Path) -> Path:
    """A folder with a sitecustomize.py that makes SPEED_PACKAGES missing from `tree`'s
    requirements.txt unimportable, so an older commit runs with the packages it asked for."""
    required = (tree / "requirements.txt").read_text() if (tree / "requirements.txt").is_file() else ""
    hidden = [name for name in SPEED_PACKAGES if name not in required]
    into.mkdir(parents=True, exist_ok=True)
    (into / "sitecustomize.py").write_text("import sys\n" + "".join(f"sys.modules[{n!r}] = None\n" for n in hidden))
    return into


def start_server(env_extra: dict[str, str], log_path: Path, tree: Path | None = None
                 ) -> tuple[subprocess.Popen, str, float]:
    """Start `python -m server` (from source tree `tree`, default this one, with only the speed
    packages it requires); returns the process, its URL and seconds until /ready answered 200."""
    port = free_port()
    env = os.environ | env_extra | {"PORT": str(port)}
    if tree is not None:
        env["PYTHONPATH"] = f"{hide_unrequired(tree, log_path.parent / f'site-{tree.name}')}{os.pathsep}{tree}"
    proc = subprocess.Popen([sys.executable, "-m", "server"], env=env, stdout=log_path.open("w"),
                            stderr=subprocess.STDOUT, cwd=tree)
    url = f"http://127.0.0.1:{port}"
    return proc, url, wait_ready(proc, url, log_path, READY_TIMEOUT_S)


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


async def load_phase(url: str, texts: list[str], concurrency: int, duration: float,
                     tasks: tuple[str, ...] = ("sentiment",)) -> dict:
    """Closed loop: `concurrency` workers, each sending a random text to a random one of `tasks`."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    deadline = time.monotonic() + duration
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                start = time.perf_counter()
                try:
                    body = {"task": rng.choice(tasks), "input": rng.choice(texts)}
                    r = await client.post("/v1/classify", json=body)
                    ok = r.status_code == 200
                    key = str(r.status_code)
                except httpx.HTTPError as exc:
                    ok, key = False, type(exc).__name__
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors[key] = errors.get(key, 0) + 1

        began = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.monotonic() - began
    latencies.sort()
    return {
        "concurrency": concurrency,
        "seconds": elapsed,
        "requests": len(latencies),
        "errors": errors,
        "throughput_rps": len(latencies) / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else None,
    }


def single_request_overhead(url: str, texts: list[str], n: int) -> dict:
    """Median latency of one request through HTTP vs the same classification in process (server idle)."""
    from anchor_cache.classifier import Classifier
    from anchor_cache.models import load_model
    from server.settings import builtin_task

    with httpx.Client(base_url=url, timeout=60) as client:
        for t in texts[:5]:
            client.post("/v1/classify", json={"task": "sentiment", "input": t})
        http_times = []
        for t in texts[:n]:
            start = time.perf_counter()
            assert client.post("/v1/classify", json={"task": "sentiment", "input": t}).status_code == 200
            http_times.append(time.perf_counter() - start)
    clf = Classifier(load_model(), builtin_task())
    for t in texts[:5]:
        clf.classify([t])
    engine_times = []
    for t in texts[:n]:
        start = time.perf_counter()
        clf.classify([t])
        engine_times.append(time.perf_counter() - start)
    http_ms, engine_ms = 1000 * statistics.median(http_times), 1000 * statistics.median(engine_times)
    return {"requests": n, "server_median_ms": http_ms, "engine_median_ms": engine_ms, "ratio": http_ms / engine_ms}


def markdown(result: dict) -> str:
    lines = ["| concurrency | requests | errors | throughput (req/s) | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
    for p in result["load"]:
        lines.append(f"| {p['concurrency']} | {p['requests']} | {sum(p['errors'].values())} | "
                     f"{p['throughput_rps']:.2f} | {p['p50_ms']:.0f} | {p['p99_ms']:.0f} |")
    load = {p["concurrency"]: p["throughput_rps"] for p in result["load"]}
    if 1 in load and max(load) > 1:
        lines.append(f"\nthroughput at {max(load)} / at 1: {load[max(load)] / load[1]:.2f}×")
    o = result["overhead"]
    lines.append(f"single request: server {o['server_median_ms']:.1f} ms vs engine {o['engine_median_ms']:.1f} ms "
                 f"(ratio {o['ratio']:.3f}, {o['requests']} requests)")
    s = result["startup"]
    lines.append(f"start to /ready: cold {s['cold_s']:.1f} s (model conversion + cache build), "
                 f"warm {s['warm_s']:.1f} s (converted model and persisted cache present)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    parser.add_argument("--overhead-requests", type=int, default=60)
    parser.add_argument("--data", type=Path, default=default_data_root() / "sst2" / "test.jsonl")
    args = parser.parse_args()
    texts = [json.loads(line)["text"] for line in args.data.read_text().splitlines() if line.strip()]
    work = Path(tempfile.mkdtemp(prefix="anchorserve-bench-"))
    try:
        # Cold: empty cache dir, so the GGUF is converted and the task cache built.
        cold_proc, _, cold_s = start_server({"ANCHORSERVE_CACHE_DIR": str(work / "cold")}, work / "cold.log")
        stop_server(cold_proc)
        # Warm: the shared converted model and a state dir whose cache the first warm start persisted.
        env = {"ANCHORSERVE_CACHE_DIR": str(cache_dir()), "ANCHORSERVE_STATE_DIR": str(work / "state")}
        stop_server(start_server(env, work / "prime.log")[0])
        proc, url, warm_s = start_server(env, work / "server.log")
        try:
            load = [asyncio.run(load_phase(url, texts, c, args.duration)) for c in args.concurrency]
            overhead = single_request_overhead(url, texts, args.overhead_requests)
        finally:
            stop_server(proc)
        assert "loaded from disk" in (work / "server.log").read_text(), "warm start rebuilt the cache"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"load": load, "overhead": overhead, "startup": {"cold_s": cold_s, "warm_s": warm_s},
              "config": vars(args) | {"data": str(args.data), "cpus": os.cpu_count()}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "load.json").write_text(json.dumps(result, indent=1))
    sys.stdout.write(markdown(result) + "\n")


if __name__ == "__main__":
    main()
