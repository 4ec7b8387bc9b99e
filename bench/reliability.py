"""Reliability on loopback: metric cardinality, event-loop blocking by huge inputs, lone surrogates.

    python -m bench.reliability --before /tmp/anchorserve-before   # writes bench/results/reliability.json
    python -m bench.reliability --tree PATH                         # one source tree only

where /tmp/anchorserve-before is a worktree of the commit before the hardening pass
(`git worktree add /tmp/anchorserve-before 4571e87`). Each tree is served by its own
`python -m server` process (cwd and PYTHONPATH = the tree, this interpreter, CPU, float32) on a
free loopback port with a tmp state dir, serving the tiny random Llama of tests/conftest.py
(written once to a tmp dir) with the built-in "sentiment" task. Three measurements per tree:

1. cardinality: on a fresh server, VmRSS of the server process and the byte size of GET /metrics
   before and after N POST /v1/classify calls naming made-up tasks (each a 404), and the number
   of anchorserve_requests_total series afterwards;
2. blocking: GET /health sampled every ~20 ms while idle, and while each of two clients sends one
   ~900 KB input ("word " * 180000, max_payload_bytes raised to 2 MB); samples sent between the
   first big request and the last answer count as "during". Rounds alternate the trees (both
   servers stay up, the one not measured is idle) and samples are pooled per tree;
3. lone surrogate: status and content type of the raw body {"task":"sentiment","input":"\\ud800"}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.common import RESULTS
from bench.load import free_port, stop_server
from tests.conftest import save_tiny_model

REPO = Path(__file__).resolve().parent.parent
SURROGATE_BODY = b'{"task":"sentiment","input":"\\ud800"}'
SERIES_PREFIX = "anchorserve_requests_total{"


@dataclass
class Server:
    proc: subprocess.Popen
    url: str

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS line")


@contextmanager
def serve_all(trees: dict[str, Path], model: Path, work: Path) -> Iterator[dict[str, Server]]:
    """One server per tree, all up at once (an idle one costs the measured one next to nothing)."""
    with ExitStack() as stack:
        yield {k: stack.enter_context(serve(tree, model, work, f"{k}-blocking")) for k, tree in trees.items()}


@contextmanager
def serve(tree: Path, model: Path, work: Path, name: str, extra: dict[str, str] | None = None) -> Iterator[Server]:
    """`python -m server` from `tree` (with `extra` settings in its environment); yields once /ready
    answers 200, stops it (SIGTERM) on exit."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANCHORSERVE_") and k not in ("HOST", "PORT")}
    env |= {
        "PYTHONPATH": str(tree), "ANCHORSERVE_HOST": "127.0.0.1", "ANCHORSERVE_PORT": str(port),
        "ANCHORSERVE_MODEL": str(model), "ANCHORSERVE_DEVICE": "cpu", "ANCHORSERVE_DTYPE": "float32",
        "ANCHORSERVE_STATE_DIR": str(work / f"state-{name}"), "ANCHORSERVE_MAX_PAYLOAD_BYTES": "2000000",
    } | (extra or {})
    log = work / f"{name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server"], cwd=tree, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    server = Server(proc, f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server for {tree} did not become ready:\n{log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{server.url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            stop_server(proc)


def scrape(client: httpx.Client) -> tuple[int, int]:
    """Bytes of GET /metrics and its number of anchorserve_requests_total series."""
    body = client.get("/metrics").text
    return len(body.encode()), sum(line.startswith(SERIES_PREFIX) for line in body.splitlines())


async def made_up_names(url: str, names: int, concurrency: int) -> dict[str, int]:
    statuses: dict[str, int] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def worker(start: int) -> None:
            for i in range(start, names, concurrency):
                r = await client.post("/v1/classify", json={"task": f"made-up-{i}", "input": "x"})
                statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return statuses


def cardinality(server: Server, names: int, concurrency: int) -> dict:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        rss_before = server.rss_mb()
        bytes_before, series_before = scrape(client)
        statuses = asyncio.run(made_up_names(server.url, names, concurrency))
        rss_after = server.rss_mb()
        bytes_after, series_after = scrape(client)
    return {"names": names, "statuses": statuses, "rss_mb_before": rss_before, "rss_mb_after": rss_after,
            "metrics_bytes_before": bytes_before, "metrics_bytes_after": bytes_after,
            "requests_total_series_before": series_before, "requests_total_series_after": series_after}


def surrogate(server: Server) -> dict:
    r = httpx.post(f"{server.url}/v1/classify", content=SURROGATE_BODY,
                   headers={"content-type": "application/json"}, timeout=30)
    return {"status": r.status_code, "content_type": r.headers.get("content-type"), "body": r.text[:300]}


async def sample_health(client: httpx.AsyncClient, interval: float, stop: asyncio.Event,
                        samples: list[tuple[float, float]]) -> None:
    """Append (send time, latency) of GET /health every `interval` s (at once after a slow one)."""
    while not stop.is_set():
        sent = time.perf_counter()
        assert (await client.get("/health")).status_code == 200
        samples.append((sent, time.perf_counter() - sent))
        await asyncio.sleep(max(0.0, sent + interval - time.perf_counter()))


def huge_body(words: int) -> bytes:
    return json.dumps({"task": "sentiment", "input": "word " * words}).encode()


async def blocking_round(url: str, interval: float, idle_s: float, words: int, clients: int) -> dict:
    """Idle /health samples, then samples while `clients` clients each send one huge input."""
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=1)) as health, \
            httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as big:
        idle: list[tuple[float, float]] = []
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_health(health, interval, stop, idle))
        await asyncio.sleep(idle_s)
        stop.set()
        await sampler

        body = huge_body(words)  # encoded here, so this process does not stall the sampler later
        loaded: list[tuple[float, float]] = []
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_health(health, interval, stop, loaded))
        await asyncio.sleep(interval)  # the sampler is running before the first big request leaves

        async def one() -> tuple[int, float, str]:
            sent = time.perf_counter()
            r = await big.post("/v1/classify", content=body, headers={"content-type": "application/json"})
            return r.status_code, time.perf_counter() - sent, r.text[:300]

        began = time.perf_counter()
        answers = await asyncio.gather(*(one() for _ in range(clients)))
        ended = time.perf_counter()
        await asyncio.sleep(2 * interval)
        stop.set()
        await sampler
    return {"idle_s": [lat for _, lat in idle], "during_s": [lat for sent, lat in loaded if began <= sent <= ended],
            "big_statuses": [a[0] for a in answers], "big_seconds": [a[1] for a in answers],
            "big_body": answers[0][2], "window_s": ended - began}


def summarise_blocking(rounds: list[dict], payload_bytes: int) -> dict:
    idle = [x for r in rounds for x in r["idle_s"]]
    during = [x for r in rounds for x in r["during_s"]]
    ms = {"idle_p50_ms": 1000 * statistics.median(idle), "idle_max_ms": 1000 * max(idle),
          "during_p50_ms": 1000 * statistics.median(during) if during else None,
          "during_max_ms": 1000 * max(during) if during else None}
    return ms | {
        "ratio_p50": ms["during_p50_ms"] / ms["idle_p50_ms"] if during else None,
        "ratio_max": ms["during_max_ms"] / ms["idle_max_ms"] if during else None,
        "idle_samples": len(idle), "during_samples": len(during), "input_bytes": payload_bytes,
        "rounds": [{"during_max_ms": 1000 * max(r["during_s"]) if r["during_s"] else None,
                    "during_samples": len(r["during_s"]), "window_s": r["window_s"],
                    "big_statuses": r["big_statuses"], "big_seconds": r["big_seconds"]} for r in rounds],
        "big_body": rounds[0]["big_body"],
    }


def source(tree: Path) -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, check=True).stdout

    changed = git("status", "--porcelain").splitlines()
    commit = git("rev-parse", "HEAD").strip()
    return {"path": str(tree), "commit": commit, "uncommitted_paths": len(changed),
            "describe": f"{commit[:7]} + uncommitted changes" if changed else commit[:7]}


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    trees = result["trees"]
    names = next(iter(trees.values()))["cardinality"]["names"]

    def row(title: str, cell: Callable[[dict, dict, dict], str]) -> str:
        return f"| {title} | " + " | ".join(cell(t["cardinality"], t["blocking"], t["surrogate"])
                                           for t in trees.values()) + " |"

    return "\n".join([
        "| | " + " | ".join(f"{k} ({t['source']['describe']})" for k, t in trees.items()) + " |",
        "|---|" + "---|" * len(trees),
        row(f"RSS MB, before → after {names} made-up names",
            lambda c, b, s: f"{c['rss_mb_before']:.0f} → {c['rss_mb_after']:.0f}"),
        row("GET /metrics bytes, before → after",
            lambda c, b, s: f"{c['metrics_bytes_before']:,} → {c['metrics_bytes_after']:,}"),
        row("anchorserve_requests_total series after", lambda c, b, s: str(c["requests_total_series_after"])),
        row("made-up-name answers", lambda c, b, s: json.dumps(c["statuses"])),
        row("/health p50 ms, idle → during huge inputs",
            lambda c, b, s: f"{fmt(b['idle_p50_ms'])} → {fmt(b['during_p50_ms'])}"),
        row("/health max ms, idle → during huge inputs",
            lambda c, b, s: f"{fmt(b['idle_max_ms'])} → {fmt(b['during_max_ms'])}"),
        row("ratio during / idle (p50, max)", lambda c, b, s: f"{fmt(b['ratio_p50'])}×, {fmt(b['ratio_max'])}×"),
        row("huge-input answers: status, slowest s",
            lambda c, b, s: ", ".join(sorted({str(x) for r in b["rounds"] for x in r["big_statuses"]}))
            + f", {max(x for r in b['rounds'] for x in r['big_seconds']):.3f}"),
        row("lone surrogate", lambda c, b, s: f"{s['status']} {s['content_type']}"),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=REPO, help="source tree to serve (default: this repo)")
    parser.add_argument("--before", type=Path, help="also measure this tree (the code before), side by side")
    parser.add_argument("--names", type=int, default=2000, help="made-up task names to send")
    parser.add_argument("--concurrency", type=int, default=8, help="connections for the made-up names")
    parser.add_argument("--rounds", type=int, default=6, help="blocking rounds per tree, alternating trees")
    parser.add_argument("--interval-ms", type=float, default=20)
    parser.add_argument("--idle-s", type=float, default=2)
    parser.add_argument("--words", type=int, default=180_000, help='huge input is "word " × this')
    parser.add_argument("--clients", type=int, default=2, help="clients sending one huge input each")
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": args.tree.resolve()} if args.before else \
        {"tree": args.tree.resolve()}
    work = Path(tempfile.mkdtemp(prefix="anchorserve-reliability-"))
    try:
        model = save_tiny_model("llama", work / "model")
        result: dict[str, dict] = {k: {"source": source(tree)} for k, tree in trees.items()}
        for k, tree in trees.items():
            with serve(tree, model, work, f"{k}-cardinality") as server:
                result[k]["cardinality"] = cardinality(server, args.names, args.concurrency)
        with serve_all(trees, model, work) as servers:
            for k, server in servers.items():
                result[k]["surrogate"] = surrogate(server)
            rounds: dict[str, list[dict]] = {k: [] for k in trees}
            for i in range(args.rounds):
                for k in list(trees)[:: 1 if i % 2 == 0 else -1]:
                    rounds[k].append(asyncio.run(blocking_round(
                        servers[k].url, args.interval_ms / 1000, args.idle_s, args.words, args.clients)))
        for k in trees:
            result[k]["blocking"] = summarise_blocking(rounds[k], len(huge_body(args.words)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {"trees": result, "command": shlex.join(["python", "-m", "bench.reliability", *sys.argv[1:]]),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
           "config": vars(args) | {"tree": str(args.tree), "before": str(args.before) if args.before else None,
                                   "model": "tests.conftest.save_tiny_model('llama')", "device": "cpu"}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "reliability.json").write_text(json.dumps(out, indent=1))
    sys.stdout.write(markdown(out) + "\n")


if __name__ == "__main__":
    main()
