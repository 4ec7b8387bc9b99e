"""A new user's first start: a fresh clone, `make serve`, and the first correct answer.

Each round clones the tree's last commit into a temporary folder and runs `make serve` there with
an empty model cache (`ANCHORSERVE_CACHE_DIR`), so the round pays the venv, the install, the GGUF
conversion and the start. It times the clone's first correct answer to the README's examples, then
stops the server and times a warm `make serve` in the same clone. pip's own download cache is the
machine's: a fresh machine also downloads the wheels (about 700 MB, the network's speed).

    python -m bench.first_start --rounds 3          # bench/results/first-start.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import RESULTS, log_tail
from bench.load import free_port

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = {"a wonderful film": "Positive", "dreadful": "Negative"}  # the README's curl examples
TIMEOUT_S = 900


def answers_right(url: str) -> bool:
    try:
        reply = httpx.post(f"{url}/v1/classify", json={"input": list(EXAMPLES)}, timeout=10)
    except httpx.TransportError:
        return False
    if reply.status_code != 200:
        return False
    return [row["label"] for row in reply.json()["data"]] == list(EXAMPLES.values())


def start(clone: Path, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, dict[str, float]]:
    """`make serve` in `clone`; seconds until its install is done and until the first right answer."""
    began = time.monotonic()
    url = f"http://127.0.0.1:{env['PORT']}"
    with log.open("a") as out:
        proc = subprocess.Popen(["make", "serve"], cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    times: dict[str, float] = {}
    while not answers_right(url):
        if proc.poll() is not None or time.monotonic() - began > TIMEOUT_S:
            raise RuntimeError(f"make serve gave no right answer; the end of {log}:\n{log_tail(log)}")
        if "installed_s" not in times and (clone / ".venv" / ".installed").exists():
            times["installed_s"] = time.monotonic() - began
        time.sleep(0.2)
    times["first_right_answer_s"] = time.monotonic() - began
    return proc, times


def stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


def one_round(work: Path) -> dict:
    clone = work / "clone"
    began = time.monotonic()
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANCHORSERVE_", "VIRTUAL_ENV"))}
    env |= {"ANCHORSERVE_CACHE_DIR": str(work / "cache"), "PORT": str(free_port())}
    log = work / "serve.log"
    proc, cold = start(clone, env, log)
    url = f"http://127.0.0.1:{env['PORT']}"
    reweighting = httpx.get(f"{url}/v1/tasks/sentiment", timeout=10).json().get("reweighting") or {}
    stop(proc)
    proc, warm = start(clone, env, log)
    stop(proc)
    return {"clone_to_first_right_answer_s": round(time.monotonic() - began - warm["first_right_answer_s"], 1),
            "install_s": round(cold.get("installed_s", 0.0), 1),
            "make_serve_to_first_right_answer_s": round(cold["first_right_answer_s"], 1),
            "warm_start_to_first_right_answer_s": round(warm["first_right_answer_s"], 1),
            "served_with_shipped_beta": bool(reweighting.get("shipped"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="first-start.json", help="the results file's name in bench/results")
    args = parser.parse_args()
    rounds = []
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="anchorserve-first-start-") as work:
            rounds.append(one_round(Path(work)))
        print(f"round {i + 1}: {rounds[-1]}", flush=True)  # noqa: T201
    summary = {key: statistics.median(r[key] for r in rounds) for key in rounds[0] if key.endswith("_s")}
    result = {"commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True, check=True).stdout.strip(),
              "rounds": rounds, "median": summary}
    (RESULTS / args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))  # noqa: T201


if __name__ == "__main__":
    main()
