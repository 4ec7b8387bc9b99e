"""Serving throughput measured with wrk: this tree against an earlier commit, side by side, with CPU per request.

    git worktree add /tmp/anchorserve-before <rev>
    python -m bench.serving --before /tmp/anchorserve-before            # bench/results/serving.json
    python -m bench.serving --before /tmp/anchorserve-before --models tiny --rounds 1 --duration 8
    python -m bench.serving --before /tmp/anchorserve-before --after-env ANCHORSERVE_API_SERVERS=2
    make bench-serving BEFORE=/tmp/anchorserve-before                    # the defaults
    python -m bench.serving --models default --default-concurrency 32 --neighbours 2   # beside two busy loops

Why wrk: an asyncio + httpx client (bench/load.py) saturates near 100 req/s on its own, so above
that it measures the client. wrk is compiled, runs closed-loop (each of C connections sends its
next request when the previous one answers) and is given 1 thread by default (`--wrk-threads`) so
it leaves the server the other cores; its own CPU share is reported ("wrk CPU").

Models (`--models`):
  tiny     a random 3-layer Llama (hidden 64, 4 heads; seed 0) with the default model's real
           tokenizer, in float32: the forward costs next to nothing, so what is measured is the
           serving path (HTTP, JSON, validation, tokenising, batching), as vLLM's dummy weights do.
           Concurrency `--concurrency` (32,256).
  default  SmolLM2-135M-Instruct in bfloat16, concurrency `--default-concurrency` (1,32): the
           single stream against 32 clients, and the previous commit against this one.

Servers: `<this venv's python> -m server` with cwd and PYTHONPATH = the tree (plus bench/load.py's
sitecustomize hiding speed packages a tree does not require), one at a time, each in its own
session and stopped with SIGTERM to its process group (SIGKILL after `--stop-timeout`). Every
tree gets its own fresh state dir for the run, the built-in sentiment task *without* its labelled
pool (no β learning at start; `ANCHORSERVE_CONFIG` points to that task in YAML), a queue of 4096
and batches of up to 256 (so 256 clients never see 429). Inherited ANCHORSERVE_* variables are
dropped except ANCHORSERVE_CACHE_DIR (where the default model's converted folder lives);
`--before-env` / `--after-env KEY=VALUE` add settings to one tree only (an older tree may reject
or ignore a setting the newer one has). Rounds alternate the order of the trees (round 1: before,
after; round 2: after, before; ...) so drifting machine load hits both alike; medians are reported.
Each start is warmed with 8 checked requests and `--warm-up` s (2) of wrk at the highest concurrency.
Unless --before is given, only --after is measured.

Load: SST-2 test sentences (the first `--sentences`), one per request, `{"input": sentence}` on
the server's default task (bench/wrk/classify.lua). Errors are wrk's non-2xx responses plus socket
errors (connect, read, write, timeout); wrk's request timeout is `--wrk-timeout`, above the
server's own 30 s deadline, so a slow answer shows up as the server's 504, not a wrk timeout.
The JSON also keeps the server's own count by status (anchorserve_requests_total), the mean batch
size, and "other load": the machine's busy CPU not used by the server tree or wrk, in cores. A
phase with other load is not comparable with one without: keep the machine otherwise idle.

CPU per request: user + system CPU of the server's process tree (the server and every descendant
alive at the snapshot, from /proc/<pid>/stat, plus cutime/cstime, which hold the descendants
already reaped) taken right before and right after wrk, divided by the requests wrk completed: a
steady-state rate, so requests still in flight when wrk stops are neither counted nor waited for.
"Outside the model" subtracts the delta of anchorserve_batch_inference_seconds_sum (forward wall
time on the model thread, from GET /metrics) before dividing. That is an approximation: it
treats a second of forward as a second of one core, which is off when torch runs the forward on
several threads (more CPU than wall time) or the thread is descheduled (less); and with several
frontend processes /metrics may describe only the one that answered. Missing metric: null.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from anchor_cache.arguments import default_data_root
from anchor_cache.models import DEFAULT_MODEL, resolve_model_dir
from bench.common import RESULTS, log_tail, wait_ready, write_result
from bench.load import free_port, hide_unrequired
from bench.throughput import commit_of
from server.settings import builtin_task

HERE = Path(__file__).resolve().parents[1]
LUA_SCRIPT = Path(__file__).resolve().parent / "wrk" / "classify.lua"
INFERENCE_SUM = "anchorserve_batch_inference_seconds_sum"
REQUESTS_TOTAL = "anchorserve_requests_total"
QUEUE_SIZE = "anchorserve_queue_size"
BATCH_SIZE = "anchorserve_batch_size"  # a histogram: _sum inputs over _count forwards
REFILL = "anchorserve_batch_refill_seconds"  # a histogram by outcome: returned, ran_out
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Setup:
    """One model configuration: what ANCHORSERVE_MODEL and _DTYPE are, and the concurrencies."""

    name: str
    model: str
    dtype: str
    concurrency: list[int]


# ---------------------------------------------------------------------------- the tiny model


def make_tiny_model(out: Path) -> Path:
    """A random 3-layer Llama with SmolLM2's tokenizer, saved to `out` (a local HF folder)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(DEFAULT_MODEL), local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),  # every id the real tokenizer can produce has an embedding row
        hidden_size=64, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2,  # head_dim 16, GQA as in SmolLM2
        max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)  # the same weights every run, so both trees and every run serve one model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------- servers


def task_config(path: Path) -> Path:
    """The built-in task minus its labelled pool, as a settings file: with `examples`, the first
    start learns β from the pool (minutes on the default model) before /ready."""
    task = builtin_task().model_dump(mode="json", exclude_unset=True, exclude={"examples"})
    path.write_text(yaml.safe_dump({"tasks": [task]}, sort_keys=False))
    return path


def request_bodies(data: Path, sentences: int, work: Path) -> tuple[list[str], Path]:
    """The first `sentences` texts of a JSONL file, and wrk's file of request bodies in `work`."""
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines() if line.strip()][:sentences]
    # ensure_ascii: the Lua side reads plain bytes and wrk sends them as they are; one body per line.
    bodies = work / "bodies.jsonl"
    bodies.write_text("".join(json.dumps({"input": t}, ensure_ascii=True) + "\n" for t in texts))
    return texts, bodies


def server_env(tree: Path, setup: Setup, state_dir: Path, config: Path, port: int, site: Path,
               extra: dict[str, str]) -> dict[str, str]:
    # A stray ANCHORSERVE_API_KEY or _MAX_BATCH_SIZE in the caller's shell would change what is measured.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANCHORSERVE_") or k == "ANCHORSERVE_CACHE_DIR"}
    return env | {
        "PYTHONPATH": f"{hide_unrequired(tree, site)}{os.pathsep}{tree}",
        "ANCHORSERVE_MODEL": setup.model,
        "ANCHORSERVE_DTYPE": setup.dtype,
        "ANCHORSERVE_DEVICE": "cpu",
        "ANCHORSERVE_STATE_DIR": str(state_dir),
        "ANCHORSERVE_CONFIG": str(config),
        "ANCHORSERVE_PORT": str(port),
        "ANCHORSERVE_MAX_QUEUED_REQUESTS": "4096",
        "ANCHORSERVE_MAX_BATCH_SIZE": "256",
    } | extra


def start_server(tree: Path, env: dict[str, str], log: Path, timeout: float) -> tuple[subprocess.Popen, str, float]:
    """`python -m server` in `tree`; returns the process, its URL and seconds until /ready was 200."""
    url = f"http://127.0.0.1:{env['ANCHORSERVE_PORT']}"
    # Its own session, so stopping it reaches every process it spawns (frontends, workers).
    proc = subprocess.Popen([sys.executable, "-m", "server"], cwd=tree, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc, url, wait_ready(proc, url, log, timeout)
    except RuntimeError as exc:
        stop_server(proc, 10)
        raise RuntimeError(f"the server from {tree}: {exc}") from None


def stop_server(proc: subprocess.Popen, timeout: float) -> dict:
    """SIGTERM to the process group, SIGKILL after `timeout`; says how it went."""
    began = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    killed = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        killed = True
    # Also after a clean exit of the leader: a child it left behind would hold the port or the CPU.
    leftovers = group_members(proc.pid)
    if killed or leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return {"stop_s": round(time.monotonic() - began, 2), "sigkill": killed, "leftover_pids": leftovers,
            "returncode": proc.returncode}


# ---------------------------------------------------------------------------- /proc and /metrics


def proc_table() -> dict[int, tuple[int, int, int]]:
    """pid → (ppid, pgid, utime + stime + cutime + cstime in ticks) for every process now."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:  # it exited while we looked
            continue
        # comm (field 2) may hold spaces and parentheses: split after the last ')'; fields[0] is field 3.
        fields = text[text.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[2]), sum(int(x) for x in fields[11:15]))
    return table


def machine_busy_s() -> float:
    """CPU seconds all cores have spent not idle since boot (/proc/stat: user … steal)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def group_members(pgid: int) -> list[int]:
    return sorted(pid for pid, (_, group, _) in proc_table().items() if group == pgid)


def tree_cpu(root: int) -> tuple[float, int]:
    """CPU seconds used so far by `root` and its descendants, and how many processes the tree has.

    Live descendants count their own time; reaped ones count in their parent's cutime/cstime
    (hence the four fields), so a worker that exits between two snapshots is not lost."""
    table = proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    ticks, count, todo = 0, 0, [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            ticks += table[pid][2]
            count += 1
            todo += children.get(pid, [])
    return ticks / CLK_TCK, count


def scrape(url: str) -> dict:
    """The few series this benchmark reads from GET /metrics; absent ones are None."""
    out: dict = {"inference_s": None, "queue_size": None, "batch_inputs": None, "batches": None, "statuses": {},
                 "refills": {}}
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        families = list(text_string_to_metric_families(text))
    except (httpx.HTTPError, ValueError):
        return out
    for family in families:
        for sample in family.samples:
            if sample.name == INFERENCE_SUM:
                out["inference_s"] = (out["inference_s"] or 0.0) + sample.value
            elif sample.name in (f"{BATCH_SIZE}_sum", f"{BATCH_SIZE}_count"):
                key = "batch_inputs" if sample.name.endswith("_sum") else "batches"
                out[key] = (out[key] or 0.0) + sample.value
            elif sample.name in (f"{REFILL}_sum", f"{REFILL}_count"):
                key = f"{sample.labels['outcome']}_{'s' if sample.name.endswith('_sum') else 'count'}"
                out["refills"][key] = out["refills"].get(key, 0.0) + sample.value
            elif sample.name == QUEUE_SIZE:
                out["queue_size"] = (out["queue_size"] or 0.0) + sample.value
            elif sample.name == REQUESTS_TOTAL and "classify" in sample.labels.get("route", ""):
                status = sample.labels.get("status", "?")
                out["statuses"][status] = out["statuses"].get(status, 0) + sample.value
    return out


# ---------------------------------------------------------------------------- load


def run_wrk(url: str, bodies: Path, connections: int, duration: float, threads: int, timeout: float,
            think_ms: float = 0.0) -> dict:
    """One wrk run; returns its done() JSON plus wrk's own CPU seconds. `think_ms`: each connection's mean
    wait before each request (0: the next goes on the answer)."""
    threads = max(1, min(threads, connections))  # wrk refuses fewer connections than threads
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--latency", f"--timeout={timeout:g}s",
           "-H", "Content-Type: application/json", "-s", str(LUA_SCRIPT), url, "--", str(bodies)]
    # Nothing else is reaped while wrk runs (the server is reaped only when stopped), so the
    # children's rusage delta is wrk's alone.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = os.environ | {"WRK_THINK_MS": f"{think_ms:g}"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + timeout + 60, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    result = json.loads(line.removeprefix("WRK_JSON "))
    result["threads"] = threads
    result["wrk_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


def warm_up(url: str, texts: list[str], bodies: Path, connections: int, threads: int, timeout: float,
            seconds: float) -> dict:
    """8 checked requests (a wrong answer stops the run here, not as a column of errors), then
    `seconds` of load so first-batch allocations (and CUDA graph captures) at this concurrency are
    not measured. A 503 right after
    /ready is retried for up to 60 s and counted: with several frontends, /ready from one of them
    does not prove that the others already reach the engine."""
    unavailable, deadline = 0, time.monotonic() + 60
    with httpx.Client(base_url=url, timeout=120) as client:
        for text in texts[:8]:
            while True:
                r = client.post("/v1/classify", json={"input": text})
                if r.status_code != 503 or time.monotonic() > deadline:
                    break
                unavailable += 1
                time.sleep(0.1)
            if r.status_code != 200 or not r.json().get("data"):
                raise RuntimeError(f"warm-up request got {r.status_code}: {r.text[:500]}")
    run_wrk(url, bodies, connections, seconds, threads, timeout)
    return {"503_after_ready": unavailable}


def wait_idle(url: str, limit: float = 30) -> None:
    """Until the queue is empty (requests wrk abandoned still run), so the next phase starts idle."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if not scrape(url)["queue_size"]:
            break
        time.sleep(0.2)
    time.sleep(0.5)


def phase(url: str, pid: int, bodies: Path, connections: int, args: argparse.Namespace) -> dict:
    """wrk at one concurrency, with the server tree's CPU and /metrics around it."""
    m0, (cpu0, _), busy0 = scrape(url), tree_cpu(pid), machine_busy_s()
    w = run_wrk(url, bodies, connections, args.duration, args.wrk_threads, args.wrk_timeout, args.think_ms)
    (cpu1, procs), busy1, m1 = tree_cpu(pid), machine_busy_s(), scrape(url)
    wait_idle(url)
    seconds = w["duration_us"] / 1e6
    errors = sum(w["errors"].values())
    ok = w["requests"] - w["errors"]["status"]
    cpu_s = cpu1 - cpu0
    delta = {k: m1[k] - m0[k] if None not in (m0[k], m1[k]) else None
             for k in ("inference_s", "batch_inputs", "batches")}
    inference_s = delta["inference_s"]
    statuses = {s: int(n - m0["statuses"].get(s, 0)) for s, n in m1["statuses"].items() if n > m0["statuses"].get(s, 0)}
    return {
        "concurrency": connections, "wrk": w, "seconds": seconds, "requests": w["requests"], "ok": ok,
        "errors": errors, "rps": ok / seconds,
        # wrk reports 0 µs when nothing completed (one request slower than the phase, say).
        **{f"{q}_ms": w["latency_us"][q] / 1000 if w["requests"] else None for q in ("p50", "p90", "p99")},
        "server_cpu_s": cpu_s, "server_processes": procs, "inference_s": inference_s, "batches": delta["batches"],
        "mean_batch": delta["batch_inputs"] / delta["batches"] if delta["batches"] else None,
        "cpu_ms_per_req": 1000 * cpu_s / w["requests"] if w["requests"] else None,
        "outside_ms_per_req": 1000 * (cpu_s - inference_s) / w["requests"] if w["requests"] and inference_s is not None
        else None,
        "wrk_cpu_share": w["wrk_cpu_s"] / seconds,
        # Whatever else ran meanwhile, in cores: a phase with other load is not comparable to one without.
        "other_cpu_cores": max(0.0, busy1 - busy0 - cpu_s - w["wrk_cpu_s"]) / seconds,
        "statuses": statuses,  # server-side, from anchorserve_requests_total ({} if absent)
        # The refill's waits after CPU forwards, by outcome: their count and seconds ({} if none ran).
        "refills": {k: v - m0["refills"].get(k, 0.0) for k, v in m1["refills"].items()},
    }


# ---------------------------------------------------------------------------- one side-by-side run


def measure(tree: Path, name: str, setup: Setup, rnd: int, env: dict[str, str], work: Path, texts: list[str],
            bodies: Path, args: argparse.Namespace) -> dict:
    log = work / f"{setup.name}-{name}-r{rnd}.log"
    proc, url, ready_s = start_server(tree, env, log, args.ready_timeout)
    try:
        warm = warm_up(url, texts, bodies, max(setup.concurrency), args.wrk_threads, args.wrk_timeout, args.warm_up)
        if warm["503_after_ready"]:
            sys.stderr.write(f"note: {setup.name} {name} round {rnd}: {warm['503_after_ready']} warm-up request(s) "
                             "got 503 after /ready was 200\n")
        phases = []
        for c in setup.concurrency:
            p = phase(url, proc.pid, bodies, c, args)
            sys.stderr.write(f"{setup.name} {name} round {rnd} c={c}: {p['rps']:.1f} req/s, p50 {p['p50_ms'] or 0:.1f} "
                             f"ms, p99 {p['p99_ms'] or 0:.1f} ms, {p['errors']} errors, {p['server_processes']} server "
                             f"processes, mean batch {p['mean_batch'] or 0:.1f}, forward {p['inference_s'] or 0:.1f} s "
                             f"of {p['server_cpu_s']:.1f} CPU s, refill waits {refill_summary(p['refills'])}, "
                             f"other load {p['other_cpu_cores']:.2f} cores\n")
            if proc.poll() is not None:  # else its connection errors would pass for a measurement
                raise RuntimeError(f"the server from {tree} exited with {proc.returncode} during the {c}-client "
                                   f"phase (-{signal.SIGTERM}: SIGTERM, not sent by this script)")
            phases.append(p)
    except BaseException:
        stop_server(proc, args.stop_timeout)
        sys.stderr.write(f"the end of {log}:\n{log_tail(log)}\n")
        raise
    stop = stop_server(proc, args.stop_timeout)
    if stop["sigkill"] or stop["leftover_pids"] or stop["returncode"] not in (0, -signal.SIGTERM):
        sys.stderr.write(f"note: {setup.name} {name} round {rnd} stopped uncleanly: {stop}\n")
    return {"round": rnd, "ready_s": ready_s, "warm_up": warm, "stop": stop, "phases": phases,
            "log_tail": log_tail(log, 1500) if any(p["errors"] for p in phases) else None}


def refill_summary(refills: dict) -> str:
    """How many of the refill's waits a phase had, and their seconds in all, per outcome."""
    outcomes = sorted({key.rsplit("_", 1)[0] for key in refills})
    return ", ".join(f"{o} {refills[f'{o}_count']:.0f} ({refills[f'{o}_s']:.2f} s in all)" for o in outcomes) or "none"


def summarise(runs: list[dict], concurrency: list[int]) -> dict:
    """Medians over rounds per concurrency (errors summed)."""
    out = {}
    for i, c in enumerate(concurrency):
        ps = [run["phases"][i] for run in runs]

        def med(key: str, ps: list[dict] = ps) -> float | None:
            values = [p[key] for p in ps if p[key] is not None]
            return statistics.median(values) if values else None

        out[c] = {k: med(k) for k in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_req", "outside_ms_per_req",
                                       "wrk_cpu_share", "other_cpu_cores")}
        out[c] |= {"errors": sum(p["errors"] for p in ps), "rounds_rps": [round(p["rps"], 1) for p in ps]}
    return out


def markdown(result: dict) -> str:
    def f(x: float | None, fmt: str) -> str:
        return "–" if x is None else format(x, fmt)

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}×" if a is not None and b else "–"

    cfg = result["config"]
    lines = [f"wrk -t{cfg['wrk_threads']} (fewer if fewer connections), {cfg['duration']:g} s per phase, median of "
             f"{cfg['rounds']} round(s), {cfg['cpus']} CPUs", "",
             "| model | tree | concurrency | req/s | p50 ms | p99 ms | errors | CPU ms/req | CPU ms/req outside model "
             "| wrk CPU | other load |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    ratios = []
    for model, per_tree in result["summary"].items():
        conc = result["setups"][model]["concurrency"]
        for c in conc:
            for tree, s in per_tree.items():
                r = s["by_concurrency"][c]
                lines.append(f"| {model} | {tree} ({s['commit']}) | {c} | {f(r['rps'], '.1f')} | "
                             f"{f(r['p50_ms'], '.1f')} | {f(r['p99_ms'], '.1f')} | {r['errors']} | "
                             f"{f(r['cpu_ms_per_req'], '.2f')} | "
                             f"{f(r['outside_ms_per_req'], '.2f')} | {f(100 * r['wrk_cpu_share'], '.0f')}% | "
                             f"{f(r['other_cpu_cores'], '.2f')} |")
            if {"before", "after"} <= per_tree.keys():
                a, b = per_tree["after"]["by_concurrency"][c]["rps"], per_tree["before"]["by_concurrency"][c]["rps"]
                ratios.append(f"{model}, concurrency {c}: req/s after / before {ratio(a, b)}")
        lo, hi = min(conc), max(conc)
        if hi > lo:
            for tree, s in per_tree.items():
                up = ratio(s["by_concurrency"][hi]["rps"], s["by_concurrency"][lo]["rps"])
                ratios.append(f"{model}, {tree}: req/s at concurrency {hi} / at {lo} {up}")
    return "\n".join([*lines, "", *ratios])


# ---------------------------------------------------------------------------- main


def key_values(items: list[str]) -> dict[str, str]:
    pairs = dict(item.split("=", 1) for item in items)
    bad = [k for k in pairs if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
    if bad:
        raise SystemExit(f"not KEY=VALUE: {bad}")
    return pairs


def main() -> None:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="source tree of the earlier commit (a git worktree); "
                        "unset: only --after is measured")
    parser.add_argument("--after", type=Path, default=HERE, help="source tree measured as 'after' (default: this one)")
    parser.add_argument("--models", type=lambda s: s.split(","), default=["tiny", "default"], help="tiny,default")
    parser.add_argument("--concurrency", type=ints, default=[32, 256], help="wrk connections for the tiny model")
    parser.add_argument("--default-concurrency", type=ints, default=[1, 32], help="for the default model")
    parser.add_argument("--duration", type=float, default=15, help="seconds of wrk per phase")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warm-up", type=float, default=2, help="seconds of wrk after each start, not measured")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk -t (2 CPUs here: 1 leaves the server more)")
    parser.add_argument("--wrk-timeout", type=float, default=60, help="wrk --timeout in seconds")
    parser.add_argument("--think-ms", type=float, default=0.0,
                        help="each connection's mean wait (exponential) before each measured request: a load at a "
                        "set rate, about connections / (think + latency), instead of the next request on the answer")
    parser.add_argument("--before-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--after-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--ready-timeout", type=float, default=600)
    parser.add_argument("--stop-timeout", type=float, default=30)
    parser.add_argument("--data", type=Path, default=default_data_root() / "sst2" / "test.jsonl")
    parser.add_argument("--out", type=Path, default=RESULTS / "serving.json")
    parser.add_argument("--neighbours", type=int, default=0,
                        help="CPU-bound processes (busy loops) running beside the server for the whole run")
    parser.add_argument("--logs", type=Path, help="keep each server's log in this folder")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed (apt-get install -y wrk)")
    unknown = set(args.models) - {"tiny", "default"}
    if unknown:
        parser.error(f"--models: unknown {sorted(unknown)} (tiny, default)")
    trees = {"after": args.after.resolve()} | ({"before": args.before.resolve()} if args.before else {})
    for name, tree in trees.items():
        if not (tree / "server" / "__main__.py").is_file():
            parser.error(f"--{name} {tree} is not an anchorserve source tree")
    extra = {"before": key_values(args.before_env), "after": key_values(args.after_env)}

    work = Path(tempfile.mkdtemp(prefix="anchorserve-serving-"))
    texts, bodies = request_bodies(args.data, args.sentences, work)
    config = task_config(work / "task.yaml")
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    config_out = vars(args) | {"before": str(args.before), "after": str(args.after), "data": str(args.data),
                               "out": str(args.out), "logs": str(args.logs), "cpus": os.cpu_count(),
                               "command": " ".join(sys.argv), "wrk": wrk_version}
    result: dict = {"config": config_out, "setups": {}, "runs": {}, "summary": {}}
    # A neighbour that wants every cycle it can get, as another tenant's batch job would.
    neighbours = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
                  for _ in range(args.neighbours)]
    try:
        for model in args.models:
            if model == "tiny":
                setup = Setup("tiny", str(make_tiny_model(work / "tiny-llama")), "float32", args.concurrency)
            else:
                setup = Setup("default", DEFAULT_MODEL, "bfloat16", args.default_concurrency)
            result["setups"][model] = vars(setup)
            order = list(trees)[::-1]  # before first in round 1 (when there is a before)
            runs: dict[str, list[dict]] = {name: [] for name in order}
            for rnd in range(1, args.rounds + 1):
                for name in order if rnd % 2 == 1 else order[::-1]:
                    tree = trees[name]
                    env = server_env(tree, setup, work / f"state-{model}-{name}", config, free_port(),
                                     work / f"site-{name}", extra[name])
                    runs[name].append(measure(tree, name, setup, rnd, env, work, texts, bodies, args))
            result["runs"][model] = runs
            result["summary"][model] = {name: {"commit": commit_of(trees[name]), "tree": str(trees[name]),
                                               "by_concurrency": summarise(rs, setup.concurrency)}
                                        for name, rs in runs.items()}
    except BaseException:
        sys.stderr.write(f"failed: server logs kept in {work}\n")
        raise
    finally:
        for neighbour in neighbours:
            neighbour.kill()
    if args.logs is not None:
        args.logs.mkdir(parents=True, exist_ok=True)
        for log in work.glob("*.log"):
            shutil.copy(log, args.logs / log.name)
    shutil.rmtree(work, ignore_errors=True)
    write_result(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
