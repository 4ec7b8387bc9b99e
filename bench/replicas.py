"""Replicas over one state store: how fast a change reaches the other replica, throughput with one
replica against two, and what a Redis restart under load does.

    python -m bench.replicas                    # bench/results/replicas.json, prints markdown
    python -m bench.replicas --changes 20 --duration 5   # a quicker look

Every server is its own `python -m server` (default model and task) on loopback; Redis is a real
`redis-server` (append-only file on) started here. Propagation: replica A replaces a task N times
(alternating two templates, so each change really builds); the delay is from A's 201 until replica
B's GET /v1/tasks/{name} shows that revision, polled every 5 ms; measured on both backends (local:
one state dir). Throughput: closed-loop clients on one replica (2 torch threads) against the same
clients split over two replicas (1 thread each, since this host's cores are shared by both).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from anchor_cache.arguments import default_data_root
from anchor_cache.data import read_jsonl
from anchor_cache.names import cache_dir
from anchor_cache.task import PRESETS
from bench.common import RESULTS
from bench.load import free_port, load_phase, start_server, stop_server

ADMIN_KEY = "bench-admin"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
TEMPLATES = ["Review: {text}\nSentiment:", "Text: {text}\nSentiment:"]


class Redis:
    """A redis-server on a free loopback port with its append-only file in `folder`."""

    def __init__(self, folder: Path) -> None:
        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.port, self.folder = free_port(), folder
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "yes", "--dir", str(self.folder)], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def task_spec(template: str) -> dict:
    return {"name": "prop", "template": template, "labels": PRESETS["sst2"][1],
            "demonstrations": [{"text": "a gripping, moving film", "label": "Positive"},
                               {"text": "dull and lifeless", "label": "Negative"}]}


def replica_env(store: dict[str, str], threads: int | None = None) -> dict[str, str]:
    env = {"ANCHORSERVE_CACHE_DIR": str(cache_dir()), "ANCHORSERVE_ADMIN_API_KEY": ADMIN_KEY,
           "ANCHORSERVE_SYNC_INTERVAL_S": "1.0"} | store
    return env | ({"OMP_NUM_THREADS": str(threads)} if threads else {})


def propagation(store: dict[str, str], work: Path, changes: int) -> dict:
    (a, url_a, _), (b, url_b, _) = (start_server(replica_env(store), work / f"prop-{n}.log") for n in "ab")
    delays = []
    try:
        with httpx.Client(timeout=60, headers=ADMIN) as http:
            for i in range(changes):
                r = http.put(f"{url_a}/admin/tasks/prop", json=task_spec(TEMPLATES[i % 2]))
                assert r.status_code == 201, r.text
                written, revision = time.monotonic(), r.json()["written_revision"]
                while True:
                    seen = http.get(f"{url_b}/v1/tasks/prop")
                    if seen.status_code == 200 and seen.json()["revision"] >= revision:
                        break
                    time.sleep(0.005)
                delays.append(time.monotonic() - written)
    finally:
        stop_server(a)
        stop_server(b)
    return {"changes": changes, "median_ms": 1000 * statistics.median(delays), "max_ms": 1000 * max(delays),
            "p90_ms": 1000 * statistics.quantiles(delays, n=10)[-1]}


def throughput(store: dict[str, str], work: Path, texts: list[str], concurrency: int, duration: float) -> dict:
    one, url, _ = start_server(replica_env(store, 2), work / "one.log")
    try:
        single = asyncio.run(load_phase(url, texts, concurrency, duration))
    finally:
        stop_server(one)
    (a, url_a, _), (b, url_b, _) = (start_server(replica_env(store, 1), work / f"two-{n}.log") for n in "ab")

    async def both() -> list[dict]:
        return await asyncio.gather(load_phase(url_a, texts, concurrency // 2, duration),
                                    load_phase(url_b, texts, concurrency // 2, duration))

    try:
        halves = asyncio.run(both())
    finally:
        stop_server(a)
        stop_server(b)
    two_rps = sum(h["throughput_rps"] for h in halves)
    return {"concurrency": concurrency, "one_replica_rps": single["throughput_rps"], "two_replicas_rps": two_rps,
            "ratio": two_rps / single["throughput_rps"],
            "errors": sum(sum(p["errors"].values()) for p in [single, *halves])}


def redis_restart(redis: Redis, work: Path, texts: list[str], down_s: float) -> dict:
    store = {"ANCHORSERVE_STATE_URL": redis.url}
    (a, url_a, _), (b, url_b, _) = (start_server(replica_env(store), work / f"restart-{n}.log") for n in "ab")
    counts = {"ok": 0, "failed": 0}
    stop = threading.Event()

    def load(url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            i = 0
            while not stop.is_set():
                r = http.post("/v1/classify", json={"task": "sentiment", "input": texts[i % len(texts)]})
                counts["ok" if r.status_code == 200 else "failed"] += 1
                i += 1

    workers = [threading.Thread(target=load, args=(u,)) for u in (url_a, url_b) * 2]
    for w in workers:
        w.start()
    try:
        with httpx.Client(timeout=30, headers=ADMIN) as http:
            time.sleep(1)
            redis.stop()
            stopped = time.monotonic()
            during = http.put(f"{url_a}/admin/tasks/prop", json=task_spec(TEMPLATES[0]))
            ready = http.get(f"{url_b}/ready").status_code
            time.sleep(max(0.0, down_s - (time.monotonic() - stopped)))
            redis.start()
            restarted = time.monotonic()
            while (after := http.put(f"{url_a}/admin/tasks/prop", json=task_spec(TEMPLATES[1]))).status_code != 201:
                time.sleep(0.05)
            writes_back_s = time.monotonic() - restarted
            revision = after.json()["written_revision"]
            while http.get(f"{url_b}/v1/tasks/prop").json().get("revision", 0) < revision:
                time.sleep(0.01)
            propagated_s = time.monotonic() - restarted
    finally:
        stop.set()
        for w in workers:
            w.join()
        stop_server(a)
        stop_server(b)
    return {"redis_down_s": down_s, "classifications_ok": counts["ok"], "classifications_failed": counts["failed"],
            "admin_write_while_down": {"status": during.status_code, "body": during.json()},
            "ready_while_down": ready, "admin_writes_back_after_s": round(writes_back_s, 2),
            "change_on_other_replica_after_s": round(propagated_s, 2)}


def markdown(result: dict) -> str:
    lines = ["| backend | changes | median ms | p90 ms | max ms |", "|---|---|---|---|---|"]
    for backend, p in result["propagation"].items():
        lines.append(f"| {backend} | {p['changes']} | {p['median_ms']:.0f} | {p['p90_ms']:.0f} | {p['max_ms']:.0f} |")
    lines += ["", "| backend | clients | 1 replica req/s | 2 replicas req/s | ratio | errors |",
              "|---|---|---|---|---|---|"]
    for backend, t in result["throughput"].items():
        lines.append(f"| {backend} | {t['concurrency']} | {t['one_replica_rps']:.1f} | {t['two_replicas_rps']:.1f} | "
                     f"{t['ratio']:.2f}× | {t['errors']} |")
    r = result["redis_restart"]
    lines.append(f"\nRedis down {r['redis_down_s']} s under load: {r['classifications_ok']} classifications ok, "
                 f"{r['classifications_failed']} failed; admin write while down: "
                 f"{r['admin_write_while_down']['status']};"
                 f" /ready while down: {r['ready_while_down']}; admin writes back {r['admin_writes_back_after_s']} s "
                 f"after the restart, the change on the other replica {r['change_on_other_replica_after_s']} s after")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=15)
    parser.add_argument("--down", type=float, default=5, help="seconds Redis stays down in the restart run")
    parser.add_argument("--data", type=Path, default=default_data_root() / "sst2" / "test.jsonl")
    args = parser.parse_args()
    texts = [r.text for r in read_jsonl(args.data, PRESETS["sst2"][1])]
    work = Path(tempfile.mkdtemp(prefix="anchorserve-replicas-"))
    redis = Redis(work)
    redis.start()
    stores = {"local": {"ANCHORSERVE_STATE_DIR": str(work / "state")},
              "redis": {"ANCHORSERVE_STATE_URL": redis.url, "ANCHORSERVE_STATE_DIR": str(work / "unused")}}
    result: dict = {"config": vars(args) | {"data": str(args.data)}, "propagation": {}, "throughput": {}}
    try:
        for backend, store in stores.items():
            result["propagation"][backend] = propagation(store, work, args.changes)
        for backend, store in stores.items():
            result["throughput"][backend] = throughput(store, work, texts, args.concurrency, args.duration)
        result["redis_restart"] = redis_restart(redis, work, texts, args.down)
    finally:
        if redis.proc is not None and redis.proc.poll() is None:
            redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "replicas.json").write_text(json.dumps(result, indent=1))
    sys.stdout.write(markdown(result) + "\n")


if __name__ == "__main__":
    main()
