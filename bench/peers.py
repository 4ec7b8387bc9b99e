"""llama.cpp (llama-cpp-python) as a peer: single-stream latency and server throughput on SST-2.

Build the optional peer (a source build, ~10 minutes on 2 cores; AMX is off because it crashed
here), then run the benchmark:

    make peers
    # = CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF \
    #     -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_OPENMP=OFF" \
    #     .venv/bin/pip install 'llama-cpp-python[server]==0.3.36'
    .venv/bin/python -m bench.peers            # writes bench/results/peers.json, prints markdown
    .venv/bin/python -m bench.peers --queries 60 --requests 256 --concurrency 32 --dtype float32
    .venv/bin/python -m bench.peers --skip-server   # single stream only

Task: SST-2 with the `PRESETS["sst2"]` template, one demonstration per class
(`seed_demonstrations(train, labels, 1, seed=42)`), test rows from `sample_rows`.

Both engines score the same way: the prompt is our vanilla ICL token sequence (context ids + query
ids; the text form tokenises to exactly those ids in llama.cpp, which is checked), and the label is
the argmax of the label words' first-token logits at the last position.

Not the same weights: llama.cpp runs the Q4_1 GGUF itself (4-bit weights, int8 dot products),
while our engine runs the dequantised weights in float32 or bfloat16. Small label disagreements
are expected from that alone.

Single stream (one process, methods alternate query by query, the order rotates, medians):
- `llama_prefix`: llama.cpp with the demonstration K/V kept (its prefix cache): only the query
  suffix is evaluated, attending to every context token.
- `llama_full`: llama.cpp evaluating the whole prompt each time (no cache), for reference.
- `ours_<dtype>_hidden_anchor`: `Classifier.label_logits_ids([ids], "hidden_anchor")`, batch 1.

Server (one after the other, loopback only, closed loop with C workers over a bounded request
list): llama-cpp-python's OpenAI server (`/v1/completions`, `max_tokens=1`, `logprobs=k`, full
prompt text) against `python -m server` (`POST /v1/classify`, the same task, hidden_anchor).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import httpx
import numpy as np
import torch

from anchor_cache.arguments import default_data_root
from anchor_cache.classifier import Classifier
from anchor_cache.data import read_jsonl, sample_rows, seed_demonstrations
from anchor_cache.models import default_gguf_path, load_model
from anchor_cache.task import PRESETS, TEXT_SLOT, TaskSpec
from bench.common import RESULTS
from bench.load import free_port, stop_server

TASK = "sst2"
HOST = "127.0.0.1"  # loopback only


# --- the task and its prompt -------------------------------------------------------------------


def task_spec(data_root: Path, seed: int) -> TaskSpec:
    template, labels = PRESETS[TASK]
    train = read_jsonl(data_root / TASK / "train.jsonl", labels)
    demos, _ = seed_demonstrations(train, labels, 1, seed)
    return TaskSpec(name=TASK, template=template, labels=labels, demonstrations=demos)


def context_text(clf: Classifier) -> str:
    """The demonstration context exactly as `encode_context` renders it before tokenising."""
    task = clf.task
    before, after = task.template.split(TEXT_SLOT)
    return "".join(before + d.text + after + " " + d.label + task.separator for d in clf.prompt.demonstrations)


# --- single stream ------------------------------------------------------------------------------


class LlamaScorer:
    """llama-cpp-python's `Llama` scoring label words at the last position of a token sequence."""

    def __init__(self, gguf: Path, n_ctx: int, threads: int, label_ids: tuple[int, ...]) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(gguf),
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=False,
            verbose=False,
        )
        self.label_ids = list(label_ids)
        self.n_vocab = self.llm.n_vocab()
        self.prefix_len = 0

    def tokenize(self, text: str) -> list[int]:
        """As `create_completion` tokenises a prompt (BOS only if the GGUF asks for it; it does not)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def _last_logits(self) -> np.ndarray:
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def set_prefix(self, ids: list[int]) -> None:
        """Evaluate the demonstrations once; their K/V stay in the context."""
        self.llm.reset()
        self.llm.eval(ids)
        self.prefix_len = len(ids)

    def suffix(self, query: list[int]) -> np.ndarray:
        """Prefix cache: drop everything after the demonstrations and evaluate only the query."""
        self.llm.n_tokens = self.prefix_len  # eval() removes K/V past n_tokens before decoding
        self.llm.eval(query)
        return self._last_logits()[self.label_ids].copy()

    def full(self, ids: list[int]) -> np.ndarray:
        """No cache: evaluate the whole prompt (recomputes the prefix K/V identically)."""
        self.llm.n_tokens = 0
        self.llm.eval(ids)
        return self._last_logits()[self.label_ids].copy()


def single_stream(args: argparse.Namespace, clfs: dict[str, Classifier], texts: list[str], gold: list[int]) -> dict:
    dtypes = list(clfs)
    clf = clfs["float32"]
    spec = clf.task
    ctx_ids = list(clf.prompt.context.ids)
    queries = clf.encode(texts)
    ctx_text = context_text(clf)
    assert clf.lm.tokenizer(ctx_text, add_special_tokens=False)["input_ids"] == ctx_ids, "context text ≠ ids"

    n_ctx = args.n_ctx
    llama = LlamaScorer(default_gguf_path(), n_ctx, args.threads, clf.prompt.label_ids)
    # The text llama.cpp's server receives must tokenise to our ids there too.
    same_tokens = sum(
        llama.tokenize(ctx_text + spec.render(t)) == ctx_ids + q for t, q in zip(texts, queries, strict=True)
    )
    llama.set_prefix(ctx_ids)
    for c in clfs.values():
        c.prefix("hidden_anchor")  # built before timing, as in bench.latency

    methods = ["llama_prefix", "llama_full"] + [f"ours_{dt}_hidden_anchor" for dt in dtypes]

    def run(method: str, q: list[int]) -> int:
        if method == "llama_prefix":
            return int(np.argmax(llama.suffix(q)))
        if method == "llama_full":
            return int(np.argmax(llama.full(ctx_ids + q)))
        dt = method.split("_")[1]
        return int(clfs[dt].label_logits_ids([q], "hidden_anchor").argmax(-1).item())

    warm = args.warmup
    times: dict[str, list[float]] = {m: [] for m in methods}
    preds: dict[str, list[int]] = {m: [] for m in methods}
    with torch.inference_mode():
        for i, q in enumerate(queries[:warm] + queries):
            for m in methods[i % len(methods) :] + methods[: i % len(methods)]:
                start = time.perf_counter()
                p = run(m, q)
                elapsed = time.perf_counter() - start
                if i >= warm:
                    times[m].append(elapsed)
                    preds[m].append(p)
        vanilla = clf.label_logits_ids(queries, "vanilla").argmax(-1).tolist()

    def agree(a: list[int], b: list[int]) -> float:
        return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)

    median = {m: 1000 * statistics.median(t) for m, t in times.items()}
    return {
        "queries": len(queries),
        "warmup": warm,
        "l_demo": len(ctx_ids),
        "l_anchor": clf.prefix("hidden_anchor").cache.num_tokens,
        "l_x_mean": statistics.mean(len(q) for q in queries),
        "llama_tokenisation_matches": same_tokens,
        "median_ms": median,
        "p90_ms": {m: 1000 * float(np.percentile(t, 90)) for m, t in times.items()},
        "agreement": {
            "llama_prefix_vs_ours_float32_vanilla": agree(preds["llama_prefix"], vanilla),
            "llama_prefix_vs_llama_full": agree(preds["llama_prefix"], preds["llama_full"]),
            "llama_prefix_vs_ours_float32_hidden_anchor": agree(
                preds["llama_prefix"], preds["ours_float32_hidden_anchor"]
            ),
            "ours_float32_hidden_anchor_vs_ours_float32_vanilla": agree(preds["ours_float32_hidden_anchor"], vanilla),
            "ours_bfloat16_vs_float32_hidden_anchor": agree(
                preds["ours_bfloat16_hidden_anchor"], preds["ours_float32_hidden_anchor"]
            ),
        },
        "accuracy": {m: agree(p, gold) for m, p in preds.items()} | {"ours_float32_vanilla": agree(vanilla, gold)},
        "llama_predictions": preds["llama_prefix"],
    }


# --- servers ------------------------------------------------------------------------------------


def wait_ready(proc: subprocess.Popen, url: str, log_path: Path, timeout: float = 300) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server not ready after {timeout} s; see {log_path}")


async def closed_loop(base_url: str, bodies: list[tuple[str, dict]], concurrency: int, parse) -> dict:
    """C workers take the next request from a shared list as soon as their previous one answers."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    answers: dict[int, int] = {}
    todo = iter(enumerate(bodies))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:

        async def worker() -> None:
            for i, (path, body) in todo:
                start = time.perf_counter()
                try:
                    r = await client.post(path, json=body)
                    key = str(r.status_code)
                    ok = r.status_code == 200
                except httpx.HTTPError as exc:
                    ok, key = False, type(exc).__name__
                if ok:
                    latencies.append(time.perf_counter() - start)
                    answers[i] = parse(r.json())
                else:
                    errors[key] = errors.get(key, 0) + 1

        began = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - began
    latencies.sort()
    return {
        "concurrency": concurrency,
        "requests": len(bodies),
        "ok": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "throughput_rps": len(latencies) / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else None,
        "predictions": [answers.get(i) for i in range(len(bodies))],
    }


def warm_up(base_url: str, bodies: list[tuple[str, dict]]) -> None:
    with httpx.Client(base_url=base_url, timeout=300) as client:
        for path, body in bodies:
            client.post(path, json=body).raise_for_status()


def llama_server(args: argparse.Namespace, spec: TaskSpec, prompts: list[str], work: Path) -> dict:
    port = free_port()
    log_path = work / "llama-server.log"
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(default_gguf_path()),
        "--host",
        HOST,
        "--port",
        str(port),
        "--n_threads",
        str(args.threads),
        "--n_threads_batch",
        str(args.threads),
        "--n_ctx",
        str(args.n_ctx),
        "--logits_all",
        "true",
    ]
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    url = f"http://{HOST}:{port}"
    labels = [" " + label for label in spec.labels]

    def parse(body: dict) -> int:
        top = body["choices"][0]["logprobs"]["top_logprobs"][0]
        scores = [top.get(label, -np.inf) for label in labels]
        return -1 if all(s == -np.inf for s in scores) else int(np.argmax(scores))

    try:
        ready_s = wait_ready(proc, f"{url}/v1/models", log_path)
        bodies = [
            ("/v1/completions", {"prompt": p, "max_tokens": 1, "logprobs": args.logprobs, "temperature": 0})
            for p in prompts
        ]
        warm_up(url, bodies[: args.server_warmup])
        result = asyncio.run(closed_loop(url, bodies, args.concurrency, parse))
    finally:
        stop_server(proc)
    return result | {"command": " ".join(cmd[1:]), "ready_s": ready_s}


def our_server(args: argparse.Namespace, spec: TaskSpec, texts: list[str], work: Path) -> dict:
    config = work / "anchorserve.json"
    config.write_text(json.dumps({"tasks": [spec.model_dump(mode="json")]}))
    env = os.environ | {
        "ANCHORSERVE_MODEL": args.model,
        "ANCHORSERVE_DTYPE": args.dtype,
        "ANCHORSERVE_DEVICE": "cpu",
        "ANCHORSERVE_STATE_DIR": str(work / "state"),
        "ANCHORSERVE_CONFIG": str(config),
        "HOST": HOST,
        "PORT": str(free_port()),
    }
    log_path = work / "anchorserve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "server"], env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT
    )
    url = f"http://{HOST}:{env['PORT']}"
    try:
        ready_s = wait_ready(proc, f"{url}/ready", log_path)
        bodies = [("/v1/classify", {"task": TASK, "input": t}) for t in texts]
        warm_up(url, bodies[: args.server_warmup])
        result = asyncio.run(
            closed_loop(url, bodies, args.concurrency, lambda b: spec.labels.index(b["data"][0]["label"]))
        )
    finally:
        stop_server(proc)
    return result | {"dtype": args.dtype, "method": "hidden_anchor", "ready_s": ready_s}


# --- report -------------------------------------------------------------------------------------


def git(*args: str) -> str | None:
    """Read-only git queries (the commit, and which files differ from it)."""
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for pkg in ("llama-cpp-python", "torch", "transformers", "anchorserve"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def markdown(result: dict) -> str:
    s = result["single_stream"]
    ms = s["median_ms"]
    names = {
        "llama_prefix": "llama.cpp Q4_1, prefix cache (query suffix only)",
        "llama_full": "llama.cpp Q4_1, full prompt each query",
        "ours_float32_hidden_anchor": "ours float32, hidden_anchor",
        "ours_bfloat16_hidden_anchor": "ours bfloat16, hidden_anchor",
    }
    base = ms["llama_prefix"]
    lines = [
        f"Single stream, batch 1, {s['queries']} SST-2 queries (L_demo {s['l_demo']} → {s['l_anchor']} anchors, "
        f"L_x {s['l_x_mean']:.1f}), alternating in one process:",
        "",
        "| engine | median ms | p90 ms | llama.cpp prefix-cache median / this | accuracy (gold) |",
        "|---|---|---|---|---|",
    ]
    for m, label in names.items():
        lines.append(f"| {label} | {ms[m]:.2f} | {s['p90_ms'][m]:.2f} | {base / ms[m]:.2f}× | {s['accuracy'][m]:.3f} |")
    lines.append("")
    lines.append("Label agreement: " + ", ".join(f"{k} {v:.3f}" for k, v in s["agreement"].items()))
    lines.append(
        f"llama.cpp tokenises our prompt text to our ids for {s['llama_tokenisation_matches']}/{s['queries']} queries."
    )
    if result.get("servers"):
        sv = result["servers"]
        lines += [
            "",
            f"Servers, {sv['ours']['concurrency']} concurrent clients, {sv['ours']['requests']} requests each "
            "(one after the other, loopback):",
            "",
            "| server | ok | errors | req/s | p50 ms | p99 ms |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in (
            ("llama-cpp-python server (Q4_1, 1 slot)", sv["llama"]),
            (f"anchorserve ({sv['ours']['dtype']}, hidden_anchor)", sv["ours"]),
        ):
            lines.append(
                f"| {name} | {r['ok']} | {sum(r['errors'].values())} | {r['throughput_rps']:.2f} | "
                f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} |"
            )
        lines.append("")
        lines.append(
            f"Server label agreement llama vs ours: {sv['agreement_llama_vs_ours']:.3f}; llama server vs "
            f"in-process llama.cpp: {sv['agreement_llama_server_vs_inprocess']}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--server-warmup", type=int, default=8)
    parser.add_argument("--dtype", default="float32", help="our server's dtype (single stream runs both)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=1024)
    parser.add_argument("--logprobs", type=int, default=10, help="top-k logprobs llama.cpp returns")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data-root", type=Path, default=default_data_root())
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "peers.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    spec = task_spec(args.data_root, args.seed)
    _, labels = PRESETS[TASK]
    test = read_jsonl(args.data_root / TASK / "test.jsonl", labels)
    rows = sample_rows(test, max(args.queries, args.requests), args.seed)
    clfs = {dt: Classifier(load_model(args.model, "cpu", dt), spec) for dt in ("float32", "bfloat16")}
    single = single_stream(args, clfs, [r.text for r in rows[: args.queries]], [r.label for r in rows[: args.queries]])

    result: dict = {"single_stream": single}
    if not args.skip_server:
        # The request list cycles through the sampled rows if there are fewer rows than requests.
        texts = [rows[i % len(rows)].text for i in range(args.requests)]
        ctx_text = context_text(clfs["float32"])
        prompts = [ctx_text + spec.render(t) for t in texts]
        work = Path(tempfile.mkdtemp(prefix="anchorserve-peers-"))
        try:
            llama = llama_server(args, spec, prompts, work)
            ours = our_server(args, spec, texts, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        both = [
            (a, b)
            for a, b in zip(llama["predictions"], ours["predictions"], strict=True)
            if a is not None and b is not None
        ]
        inproc = single["llama_predictions"]
        n = min(len(inproc), len(llama["predictions"]))
        same = [llama["predictions"][i] == inproc[i] for i in range(n) if llama["predictions"][i] is not None]
        result["servers"] = {
            "llama": llama,
            "ours": ours,
            "agreement_llama_vs_ours": sum(a == b for a, b in both) / max(1, len(both)),
            "agreement_llama_server_vs_inprocess": f"{sum(same)}/{len(same)}",
            "llama_missing_labels_in_top_k": sum(p == -1 for p in llama["predictions"]),
            "llama_server_note": "llama-cpp-python's server has no parallel slots or continuous batching: one "
            "Llama behind a global lock, requests run one at a time; it reuses the K/V of the prompt prefix it "
            "shares with the previous request (the demonstrations), and computes logits for every evaluated "
            "token (logits_all, needed for logprobs)",
        }

    result["config"] = vars(args) | {
        "data_root": str(args.data_root),
        "out": str(args.out),
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": {
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            # The machine is shared: other work running meanwhile inflates every engine's numbers alike.
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "versions": versions(),
        "git_commit": git("rev-parse", "HEAD"),
        "git_uncommitted": (git("--no-optional-locks", "status", "--porcelain") or "").splitlines(),
        "gguf": default_gguf_path().name,
        "weights": "llama.cpp runs the Q4_1 GGUF (4-bit); ours runs its dequantised weights in float32/bfloat16",
    }
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    sys.stdout.write(markdown(result) + "\n")


if __name__ == "__main__":
    main()
