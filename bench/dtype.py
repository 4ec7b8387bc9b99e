"""float32 vs bfloat16: accuracy, label loyalty, fp32↔bf16 agreement and latency of Hidden_anchor.

    python -m bench.dtype                                   # writes bench/results/dtype.json, prints markdown
    python -m bench.dtype --limit 5 --seeds 42 --datasets sst2 --out /tmp/dtype-smoke.json   # smoke run
    python -m bench.dtype --report                          # markdown from an existing JSON only

Backs `dtype="auto"` choosing bfloat16 on CPUs with fast bf16 matmuls (anchor_cache.models).
The same model is loaded twice, in float32 and bfloat16. Per dataset and seed the rows, the
demonstrations (1 per class) and the methods (vanilla, hidden_anchor) are exactly those of
`python -m anchor_cache eval` (same sampling, same per-method run as `anchor_cache.evaluate`), so:

- accuracy and label loyalty (agreement with vanilla ICL *in the same dtype*, as the eval does);
- agreement: the fraction of rows whose predicted label is the same in float32 and bfloat16, per
  method, and `loyalty_to_fp32_vanilla` (bf16 method vs fp32 vanilla: the end-to-end deviation);
- latency: Hidden_anchor at batch 1 (each of `--latency-queries` queries) and batch 32 (one batch
  of 32 queries, `--repeats` times), float32 and bfloat16 interleaved (order alternates) after a
  warm-up, medians; building caches is not timed, as in bench/latency.py.

Percentages are the mean and sample standard deviation over seeds (std 0 for one seed).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from anchor_cache.cache import kv_bytes_per_token
from anchor_cache.classifier import Classifier
from anchor_cache.data import read_jsonl, sample_rows, seed_demonstrations
from anchor_cache.evaluate import VARIANTS, _jaccard, _run_method
from anchor_cache.forward import label_logits, last_hidden
from anchor_cache.models import BF16_CPU_FLAGS, LoadedModel, auto_cpu_dtype, cpu_flags, load_model
from anchor_cache.task import PRESETS, TaskSpec
from bench.common import RESULTS, dataset_parser

DTYPES = ("float32", "bfloat16")
METHODS = ("vanilla", "hidden_anchor")  # vanilla first: every loyalty's reference
LATENCY_BATCHES = (1, 32)
WARMUP = 3


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def _classifiers(lms: dict[str, LoadedModel], name: str, seed: int, train) -> dict[str, Classifier]:
    template, labels = PRESETS[name]
    demos, _ = seed_demonstrations(train, labels, 1, seed)
    task = TaskSpec(name=name, template=template, labels=labels, demonstrations=demos)
    return {dt: Classifier(lm, task, seed=seed) for dt, lm in lms.items()}


def quality(lms: dict[str, LoadedModel], data: Path, name: str, seeds: list[int], limit: int,
            batch_size: int) -> dict[str, Any]:
    """Accuracy/loyalty per dtype and method, and fp32↔bf16 agreement, mean ± std over seeds."""
    _, labels = PRESETS[name]
    train = read_jsonl(data / "train.jsonl", labels)
    test = read_jsonl(data / "test.jsonl", labels)
    per_seed: dict[str, dict[str, list[dict[str, float]]]] = {dt: {m: [] for m in METHODS} for dt in DTYPES}
    agreement: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    off = tqdm(disable=True)
    for seed in seeds:
        rows = sample_rows(test, limit, seed)
        texts, gold = [r.text for r in rows], np.array([r.label for r in rows])
        clfs = _classifiers(lms, name, seed, train)
        preds: dict[str, dict[str, np.ndarray]] = {}
        for dt in DTYPES:
            runs = {m: _run_method(clfs[dt], VARIANTS[m], None, texts, batch_size, kv_bytes_per_token(lms[dt]), off)
                    for m in METHODS}
            ref = runs["vanilla"]
            for m, run in runs.items():
                per_seed[dt][m].append({
                    "seed": seed,
                    "accuracy": 100 * float((run.preds == gold).mean()),
                    "label_loyalty": 100 * float((run.preds == ref.preds).mean()),
                    "word_loyalty": 100 * float(np.mean(list(map(_jaccard, run.topk, ref.topk)))),
                    "n": len(texts),
                })
            preds[dt] = {m: run.preds for m, run in runs.items()}
            sys.stderr.write(f"{name} seed {seed} {dt}: " + ", ".join(
                f"{m} acc {per_seed[dt][m][-1]['accuracy']:.1f}" for m in METHODS) + "\n")
        fp32, bf16 = preds["float32"], preds["bfloat16"]
        for m in METHODS:
            agreement[m].append({
                "seed": seed,
                "label_agreement": 100 * float((fp32[m] == bf16[m]).mean()),
                "loyalty_to_fp32_vanilla": 100 * float((bf16[m] == fp32["vanilla"]).mean()),
                "n": len(texts),
            })
    out: dict[str, Any] = {}
    for dt in DTYPES:
        out[dt] = {
            m: {k: mean_std([s[k] for s in seeds_]) for k in ("accuracy", "label_loyalty", "word_loyalty")}
            | {"per_seed": seeds_}
            for m, seeds_ in per_seed[dt].items()
        }
    out["agreement"] = {
        m: {k: mean_std([s[k] for s in seeds_]) for k in ("label_agreement", "loyalty_to_fp32_vanilla")}
        | {"per_seed": seeds_}
        for m, seeds_ in agreement.items()
    }
    return out


def latency(lms: dict[str, LoadedModel], data: Path, name: str, seed: int, n_queries: int,
            repeats: int) -> dict[str, Any]:
    """Hidden_anchor at batch 1 and 32, float32 and bfloat16 interleaved; medians in ms."""
    _, labels = PRESETS[name]
    train = read_jsonl(data / "train.jsonl", labels)
    clfs = _classifiers(lms, name, seed, train)
    prefixes = {dt: clf.prefix("hidden_anchor") for dt, clf in clfs.items()}  # built untimed
    rows = sample_rows(read_jsonl(data / "test.jsonl", labels), max(n_queries, max(LATENCY_BATCHES)), seed)
    queries = clfs["float32"].encode([r.text for r in rows])  # one tokenizer: same ids for both dtypes
    label_ids = clfs["float32"].prompt.label_ids

    def timed(dt: str, batch: list[list[int]]) -> float:
        lm = lms[dt]
        start = time.perf_counter()
        label_logits(lm, last_hidden(lm, prefixes[dt], batch), label_ids).argmax(-1).tolist()
        return 1000 * (time.perf_counter() - start)

    jobs = {1: [[q] for q in queries[:n_queries]], 32: [queries[:32]] * repeats}
    times: dict[int, dict[str, list[float]]] = {b: {dt: [] for dt in DTYPES} for b in LATENCY_BATCHES}
    with torch.inference_mode():
        for b, batches in jobs.items():
            for i, batch in enumerate(batches[:1] * WARMUP + batches):
                for dt in DTYPES if i % 2 == 0 else DTYPES[::-1]:
                    ms = timed(dt, batch)
                    if i >= WARMUP:
                        times[b][dt].append(ms)
    out: dict[str, Any] = {"l_anchor": prefixes["float32"].cache.num_tokens,
                           "l_x": statistics.mean(len(q) for q in queries[:n_queries])}
    for b in LATENCY_BATCHES:
        median = {dt: statistics.median(t) for dt, t in times[b].items()}
        out[f"batch_{b}"] = {"median_ms": median, "samples": len(times[b]["float32"]),
                             "bf16_speedup": median["float32"] / median["bfloat16"]}
    return out


def _pm(stat: dict[str, float]) -> str:
    return f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"{cfg['model']} on {cfg['device']} ({cfg['threads']} threads; bf16 matmul flags: "
        f"{','.join(cfg['bf16_flags']) or 'none'}; auto → {cfg['auto_cpu_dtype']}), 1 demonstration per class, "
        f"seeds {','.join(map(str, cfg['seeds']))}, up to {cfg['limit']} test rows per seed. "
        "Mean ± std over seeds (%); loyalty is to vanilla in the same dtype; agreement is fp32 vs bf16 labels.",
        "",
        "| dataset | method | acc fp32 | acc bf16 | loyalty fp32 | loyalty bf16 | fp32↔bf16 agreement | "
        "bf16 vs fp32 vanilla |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, d in result["datasets"].items():
        q = d["quality"]
        for m in METHODS:
            a = q["agreement"][m]
            lines.append(
                f"| {name} | {m} | {_pm(q['float32'][m]['accuracy'])} | {_pm(q['bfloat16'][m]['accuracy'])} | "
                f"{_pm(q['float32'][m]['label_loyalty'])} | {_pm(q['bfloat16'][m]['label_loyalty'])} | "
                f"{_pm(a['label_agreement'])} | {_pm(a['loyalty_to_fp32_vanilla'])} |"
            )
    lines += ["", "Hidden_anchor latency, medians (ms); fp32 and bf16 interleaved.", "",
              "| dataset | L_anchor | L_x | batch 1 fp32 | batch 1 bf16 | bf16 speed-up | batch 32 fp32 | "
              "batch 32 bf16 | bf16 speed-up |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, d in result["datasets"].items():
        lat = d.get("latency")
        if lat is None:
            continue
        b1, b32 = lat["batch_1"], lat["batch_32"]
        lines.append(
            f"| {name} | {lat['l_anchor']} | {lat['l_x']:.1f} | {b1['median_ms']['float32']:.1f} | "
            f"{b1['median_ms']['bfloat16']:.1f} | {b1['bf16_speedup']:.2f}× | {b32['median_ms']['float32']:.1f} | "
            f"{b32['median_ms']['bfloat16']:.1f} | {b32['bf16_speedup']:.2f}× |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = dataset_parser(__doc__)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[42, 43, 44])
    parser.add_argument("--limit", type=int, default=100, help="test rows per seed")
    parser.add_argument("--batch-size", type=int, default=16, help="evaluation batch size (as the eval)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--latency-queries", type=int, default=20, help="batch-1 queries per dtype (≥3)")
    parser.add_argument("--repeats", type=int, default=5, help="timed batch-32 runs per dtype (≥3)")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "dtype.json")
    parser.add_argument("--report", action="store_true", help="only print the markdown of an existing --out")
    args = parser.parse_args()
    if args.report:
        sys.stdout.write(markdown(json.loads(args.out.read_text())) + "\n")
        return
    if min(args.latency_queries, args.repeats) < 3:
        parser.error("--latency-queries and --repeats must be at least 3 (medians over ≥3 runs)")
    lms = {dt: load_model(args.model, args.device, dt) for dt in DTYPES}
    flags = cpu_flags()
    config = {k: v for k, v in vars(args).items() if k not in ("report", "dtype")} | {
        "model": lms["float32"].name, "device": str(lms["float32"].device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_flags": [f for f in BF16_CPU_FLAGS if f in flags], "auto_cpu_dtype": auto_cpu_dtype(flags),
        "methods": list(METHODS), "shots_per_class": 1,
    }
    result: dict[str, Any] = {"config": config, "datasets": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.datasets:
        data = args.data_root / name
        entry: dict[str, Any] = {"quality": quality(lms, data, name, args.seeds, args.limit, args.batch_size)}
        if not args.no_latency:
            entry["latency"] = latency(lms, data, name, args.seeds[0], args.latency_queries, args.repeats)
        result["datasets"][name] = entry
        args.out.write_text(json.dumps(result, indent=1, default=str))  # partial results survive a stop
    sys.stdout.write(markdown(result) + "\n")


if __name__ == "__main__":
    main()
