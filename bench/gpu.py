"""The serving path's GPU figures, in one run of about five minutes on a lent GPU.

    python -m bench.gpu --model DIR --test sst2/test.jsonl --train sst2/train.jsonl --out gpu.json
    python -m bench.gpu --model CONFIG_DIR --dummy-weights ...    # a config and tokenizer, random weights

Engine, in process (bfloat16, SST-2 template, 1 demonstration per class drawn with seed 42,
Hidden_anchor), medians of `--repeats` after warm-ups, timed between `torch.cuda.synchronize()`:
- throughput at each of `--batches`: the eager packed forward (what serves without
  graphs) and the same batch replayed from CUDA graphs (anchor_cache/graphs.py); the first graphed
  call, which captures, is timed apart, and so is the graph's replay alone (the GPU's share of a
  graphed call; the rest is the host's batch work). Beside them the largest logit difference between the two
  and how often their argmax agrees (bfloat16, so not zero: the graphs' fixed spans group the
  attention sums differently);
- β's overhead: a random β (σ 0.5) against none, interleaved, with graphs and eagerly;
- float32: graphs against the eager forward at batch 64 with β, an equivalence check.

Server, through HTTP: `python -m server` on the GPU for each of `--api-servers`, under wrk with
single-input requests (bench/serving.py's `measure`: 8 checked requests, `--warm-up` s of load that
also captures the graphs, then `--duration` s per concurrency, CPU per request from /proc).

`--dummy-weights`: DIR holds a config and a tokenizer, and the weights are random (seed 0), as
vLLM's `--load-format dummy`: the speed of a forward does not depend on its weights' values, and a
lent GPU cannot fetch the real ones (what travels there stays under 64 MiB).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from anchor_cache.classifier import Classifier
from anchor_cache.data import read_jsonl, sample_rows, seed_demonstrations
from anchor_cache.graphs import PackedGraphs, Shape
from anchor_cache.models import load_model
from anchor_cache.packed import Layout, packed_label_logits
from anchor_cache.task import PRESETS, Method, TaskSpec
from bench.load import free_port
from bench.serving import HERE, Setup, hide_unrequired, measure, server_env, task_config


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `fn` after two warm-ups, synchronising the GPU around each call."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def dummy_model(config_dir: Path, out: Path) -> Path:
    """A model folder with `config_dir`'s config and tokenizer and random weights (seed 0)."""
    config = AutoConfig.from_pretrained(config_dir, local_files_only=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(config_dir, local_files_only=True).save_pretrained(out)
    return out


def compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict:
    x, y = torch.stack(a).float(), torch.stack(b).float()
    return {"max_logit_diff": float((x - y).abs().max()),
            "argmax_agreement": float((x.argmax(1) == y.argmax(1)).float().mean())}


def engine(args: argparse.Namespace, spec: TaskSpec, texts: list[str], dtype: str = "bfloat16") -> dict:
    lm = load_model(str(args.model), args.device, dtype)
    clf = Classifier(lm, spec)
    queries = clf.encode(texts)
    graphs = PackedGraphs(lm)
    torch.manual_seed(1)
    beta = torch.randn_like(clf.zero_beta()) * 0.5

    def rows(batch: int, weighted: bool = False) -> list:
        return [clf.packed_row(q, Method.HIDDEN_ANCHOR, beta if weighted else None) for q in queries[:batch]]

    def eager(batch_rows: list) -> Callable[[], list[torch.Tensor]]:
        return lambda: packed_label_logits(lm, batch_rows)

    def graphed(batch_rows: list) -> Callable[[], list[torch.Tensor]]:
        return lambda: packed_label_logits(lm, batch_rows, graphs=graphs)

    name = torch.cuda.get_device_name() if lm.device.type == "cuda" else "cpu"
    out: dict = {"device": name, "dtype": dtype, "throughput": {}, "beta_overhead": {}}
    with torch.inference_mode():
        if dtype == "float32":  # the equivalence check only
            weighted = rows(64, weighted=True)
            out["graphs_vs_eager_beta_64"] = compare(eager(weighted)(), graphed(weighted)())
            out["graphs_captured"] = graphs.captured
            return out
        for batch in args.batches:
            plain = rows(batch)
            sync()
            start = time.perf_counter()
            graphed(plain)()
            sync()
            first = time.perf_counter() - start
            t_eager, t_graph = timed(eager(plain), args.repeats), timed(graphed(plain), args.repeats)
            static = graphs._forwards.get(Shape.of(Layout.of(lm, plain), plain))
            replay = static.graph.replay if static is not None and static.graph is not None else None
            out["throughput"][batch] = {"eager_ms": 1000 * t_eager, "graph_ms": 1000 * t_graph,
                                        # the graph alone: the GPU's time, without the host's batch work
                                        "replay_ms": 1000 * timed(replay, args.repeats) if replay else None,
                                        "eager_rps": batch / t_eager, "graph_rps": batch / t_graph,
                                        "speedup": t_eager / t_graph, "first_graph_call_ms": 1000 * first,
                                        **compare(eager(plain)(), graphed(plain)())}
        for batch in args.batches:
            plain, weighted = rows(batch), rows(batch, weighted=True)
            runs = {"graph": graphed(plain), "graph_beta": graphed(weighted), "eager": eager(plain),
                    "eager_beta": eager(weighted)}
            times: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(args.repeats):  # interleaved, so drift hits all alike
                for key, fn in runs.items():
                    times[key].append(timed(fn, 1))
            ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
            out["beta_overhead"][batch] = {**{f"{k}_ms": v for k, v in ms.items()},
                                           "graph_ratio": ms["graph_beta"] / ms["graph"],
                                           "eager_ratio": ms["eager_beta"] / ms["eager"]}
    out["graphs_captured"] = graphs.captured
    return out


def server(args: argparse.Namespace, texts: list[str], work: Path) -> dict:
    bodies = work / "bodies.jsonl"
    bodies.write_text("".join(json.dumps({"input": t}, ensure_ascii=True) + "\n" for t in texts))
    config = task_config(work / "task.yaml")
    setup = Setup("gpu", str(args.model), "bfloat16", args.concurrency)
    path = os.pathsep.join([str(hide_unrequired(HERE, work / "site")), str(HERE), os.environ.get("PYTHONPATH", "")])
    runs = {}
    for n in args.api_servers:
        env = server_env(HERE, setup, work / f"state-{n}", config, free_port(), work / "site", {
            "ANCHORSERVE_DEVICE": args.device, "ANCHORSERVE_API_SERVERS": str(n),
            "ANCHORSERVE_MAX_BATCH_TOKENS": "65536", "PYTHONPATH": path})
        try:
            runs[f"api_servers={n}"] = measure(HERE, f"api{n}", setup, 1, env, work, texts, bodies, args)
        except Exception as exc:  # the other setups' figures still count
            runs[f"api_servers={n}"] = {"failed": f"{type(exc).__name__}: {exc}"}
            logging.exception("the server with %d frontends failed", n)
    return runs


def summary(result: dict) -> dict:
    """The headline figures: the engine's best graphed throughput, and the fastest HTTP run with its share of it."""
    eng = result.get("engine", {})
    best = max((p["graph_rps"] for p in eng.get("throughput", {}).values()), default=None)
    runs = result.get("server", {})
    http = [(name, p["concurrency"], p["rps"], p["p99_ms"]) for name, run in runs.items()
            if isinstance(run, dict) and "phases" in run for p in run["phases"]]
    top = max(http, key=lambda h: h[2], default=None)
    return {"engine_graph_rps_best": best,
            "http_best": top and {"setup": top[0], "concurrency": top[1], "rps": top[2], "p99_ms": top[3],
                                  "of_engine": top[2] / best if best else None}}


def main() -> None:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a model folder (with --dummy-weights: config "
                        "and tokenizer only)")
    parser.add_argument("--dummy-weights", action="store_true", help="random weights of the model's config")
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batches", type=ints, default=[1, 64, 256])
    parser.add_argument("--api-servers", type=ints, default=[0, 4, 8], help="HTTP frontends of each server run")
    parser.add_argument("--concurrency", type=ints, default=[32, 256], help="wrk connections")
    parser.add_argument("--duration", type=float, default=10, help="seconds of wrk per phase")
    parser.add_argument("--warm-up", type=float, default=8, help="seconds of wrk after each start, not measured")
    parser.add_argument("--wrk-threads", type=int, default=4)
    parser.add_argument("--wrk-timeout", type=float, default=60)
    parser.add_argument("--ready-timeout", type=float, default=300)
    parser.add_argument("--stop-timeout", type=float, default=30)
    parser.add_argument("--parts", type=lambda s: s.split(","), default=["engine", "float32", "server"])
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to dry-run this script")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    work = Path(tempfile.mkdtemp(prefix="anchorserve-gpu-"))
    if args.dummy_weights:
        args.model = dummy_model(args.model, work / "model")
    template, labels = PRESETS["sst2"]
    demos, _ = seed_demonstrations(read_jsonl(args.train, labels), labels, 1, 42)
    spec = TaskSpec(name="sst2", template=template, labels=labels, demonstrations=demos)
    texts = [r.text for r in sample_rows(read_jsonl(args.test, labels), 512, 42)]
    result = {"command": " ".join(sys.argv), "cpus": os.cpu_count(), "dummy_weights": args.dummy_weights}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    parts = {"engine": lambda: engine(args, spec, texts), "float32": lambda: engine(args, spec, texts, "float32"),
             "server": lambda: server(args, texts, work)}
    for part in args.parts:  # each part is kept as soon as it is done
        try:
            result[part] = parts[part]()
        except Exception as exc:  # one failed part must not lose the others' figures
            result[part] = {"failed": f"{type(exc).__name__}: {exc}"}
            logging.exception("part %s failed", part)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        result["summary"] = summary(result)
        args.out.write_text(json.dumps(result, indent=1))
    sys.stdout.write(json.dumps(result["summary"], indent=1) + "\n")


if __name__ == "__main__":
    main()
