"""Beyond the paper: more labelled rows per class, counted at Hidden_anchor's cost.

    python -m bench.beyond                      # bench/results/beyond.json, docs/beyond-curve.png
    python -m bench.beyond --datasets sst2 --seeds 42,43 --limit 100   # a quicker look
    python -m bench.beyond --device cuda --parts curve                 # one part; the rest is kept

1. The comparison: on each dataset, 5 seeds, `--limit` test rows per seed, 16 labelled rows per class:
   zero-shot, vanilla 1-shot, β + Hidden_anchor (β learned on the same 16 rows per class, 16 a step,
   as a task's pool teaches it) against `linear_head` (with and without that β), `knn` and
   `many_shot` (anchor_cache/heads.py, many_shot.py) — the eval's own code.
2. The curve: accuracy of the pool methods, and of β + Hidden_anchor and the served head with β
   learned on the same rows, with 1, 4, 16 and 64 rows per class (same seeds), as a PNG.
3. Serving cost: batch-1 latency of every candidate `method: auto` may serve against the same
   task's Hidden_anchor, through the serving forward, interleaved, medians; head and cache bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from anchor_cache.analysis.plots import new_figure, to_png
from anchor_cache.arguments import default_data_root
from anchor_cache.auto import CANDIDATES
from anchor_cache.classifier import Classifier
from anchor_cache.data import read_jsonl, sample_rows, seed_demonstrations, training_draw
from anchor_cache.evaluate import EvalConfig, evaluate
from anchor_cache.models import load_model
from anchor_cache.packed import packed_label_logits
from anchor_cache.reweighting import learn_pool_beta, pool_config
from anchor_cache.task import PRESETS, Demonstration, Method, TaskSpec
from bench.common import DATASETS, RESULTS

PARTS = ["compare", "curve", "latency"]
BASELINES = ["zero_shot", "vanilla", "hidden_anchor_reweighted"]
POOL_METHODS = ["linear_head", "linear_head_reweighted", "knn", "many_shot"]
CURVE_METHODS = ["linear_head", "knn", "many_shot", "hidden_anchor_reweighted", "linear_head_reweighted"]
DOCS = Path(__file__).resolve().parents[1] / "docs"


def spread(per_seed: list[dict], key: str = "accuracy") -> dict[str, float]:
    values = [s[key] for s in per_seed]
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def compare(lm, data_root: Path, datasets: list[str], seeds: list[int], limit: int, pool: int,
            methods: list[str]) -> dict:
    out = {}
    for ds in datasets:
        template, labels = PRESETS[ds]
        cfg = EvalConfig(data=data_root / ds, template=template, labels=labels, methods=methods,
                         seeds=seeds, limit=limit, train_per_class=pool, pool_per_class=pool,
                         reweight=pool_config(Method.HIDDEN_ANCHOR))
        result = evaluate(lm, cfg, progress=False)
        out[ds] = {m: spread(r["per_seed"]) | {"per_seed": [s["accuracy"] for s in r["per_seed"]],
                                                "kv_cache_bytes": r["kv_cache_bytes"]}
                   for m, r in result["methods"].items() if m in methods}
        sys.stderr.write(f"{ds}: " + ", ".join(f"{m} {v['mean']:.1f}" for m, v in out[ds].items()) + "\n")
    return out


def curve(lm, data_root: Path, datasets: list[str], seeds: list[int], limit: int, sizes: list[int]) -> dict:
    out: dict = {}
    for ds in datasets:
        template, labels = PRESETS[ds]
        for size in sizes:
            cfg = EvalConfig(data=data_root / ds, template=template, labels=labels, methods=CURVE_METHODS,
                             seeds=seeds, limit=limit, pool_per_class=size, train_per_class=size,
                             reweight=pool_config(Method.HIDDEN_ANCHOR))
            result = evaluate(lm, cfg, progress=False)
            for m in CURVE_METHODS:
                out.setdefault(ds, {}).setdefault(m, {})[size] = spread(result["methods"][m]["per_seed"])
        sys.stderr.write(f"curve {ds} done\n")
    return out


def plot_curve(results: dict, sizes: list[int]) -> bytes:
    fig, axes = new_figure(4.2 * len(results), 3.6, len(results))
    for ax, (ds, methods) in zip(axes[0], results.items(), strict=True):
        for m, by_size in methods.items():
            by_size = {int(k): v for k, v in by_size.items()}  # JSON keys are strings
            means = [by_size[s]["mean"] for s in sizes]
            stds = [by_size[s]["std"] for s in sizes]
            ax.errorbar(sizes, means, yerr=stds, marker="o", capsize=3, label=m)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_title(ds)
        ax.set_xlabel("labelled rows per class")
        ax.set_ylabel("accuracy (%)")
    axes[0][0].legend(fontsize=8)
    return to_png(fig)


def latency(lm, data_root: Path, repeats: int, pool: int) -> dict:
    """Batch-1 ms of every candidate `method: auto` may serve (anchor_cache/auto.py) on one SST-2 task
    with a pool, through the serving forward, interleaved: each is the Hidden_anchor forward (reading
    more layers for a head, over the pool's label words for many-shot), with the pool's β where the
    candidate has it; medians, each against plain Hidden_anchor."""
    template, labels = PRESETS["sst2"]
    train = read_jsonl(data_root / "sst2" / "train.jsonl", labels)
    demos, used = seed_demonstrations(train, labels, 1, 42)
    examples = [Demonstration(text=r.text, label=labels[r.label])
                for r in training_draw(train, used, len(labels), pool, 42)]
    spec = TaskSpec(name="sst2", template=template, labels=labels, demonstrations=demos, examples=examples)
    clf = Classifier(lm, spec)
    beta, _ = learn_pool_beta(clf)
    # a classifier per candidate: one keeps one head per method, fitted again whenever β changes
    served = {c.name: (Classifier(lm, spec), c.method, beta if c.reweight else None) for c in CANDIDATES}
    queries = clf.encode([r.text for r in sample_rows(read_jsonl(data_root / "sst2" / "test.jsonl", labels), 32, 7)])
    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)

    def run(name: str) -> float:
        own, method, b = served[name]
        start = time.perf_counter()
        for q in queries:
            packed_label_logits(lm, [own.packed_row(q, method, b)])
        sync()
        return 1000 * (time.perf_counter() - start) / len(queries)

    times: dict[str, list[float]] = {name: [] for name in served}
    with torch.inference_mode():
        for name in served:  # warm-up, and each method's head, features or cache built once
            run(name)
        for r in range(repeats):
            for name in list(served)[:: 1 if r % 2 == 0 else -1]:
                times[name].append(run(name))
    med = {name: statistics.median(v) for name, v in times.items()}
    return {"ms": med, "ratio": {name: ms / med["hidden_anchor"] for name, ms in med.items()},
            "head_bytes": clf.head(Method.LINEAR_HEAD, beta).nbytes,
            "cache_bytes": clf.prefix(Method.HIDDEN_ANCHOR).kv_bytes, "device": lm.device.type}


def markdown(result: dict) -> str:
    """The comparison table (mean ± std over seeds) and the target checks, as RESULTS shows them."""
    compare_ = result["compare"]
    methods = BASELINES + POOL_METHODS
    lines = ["| dataset | " + " | ".join(methods) + " | best pool − best baseline |",
             "|---|" + "---|" * (len(methods) + 1)]
    gaps = []
    for ds, row in compare_.items():
        best_base = max(row[m]["mean"] for m in BASELINES)
        best_pool = max(row[m]["mean"] for m in POOL_METHODS)
        gaps.append(best_pool - best_base)
        cells = [f"{row[m]['mean']:.1f} ± {row[m]['std']:.1f}" for m in methods]
        lines.append(f"| {ds} | " + " | ".join(cells) + f" | {best_pool - best_base:+.1f} |")
    means = {m: np.mean([row[m]["mean"] for row in compare_.values()]) for m in methods}
    lines.append("| **mean** | " + " | ".join(f"{means[m]:.1f}" for m in methods) +
                 f" | {np.mean(gaps):+.1f} (per dataset) |")
    per_method = {m: means[m] - max(means[b] for b in BASELINES) for m in POOL_METHODS}
    lines.append("\nBest pool method's mean against the best baseline's mean: " +
                 ", ".join(f"{m} {v:+.1f}" for m, v in per_method.items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=lambda s: s.split(","), default=DATASETS)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[42, 43, 44, 45, 46])
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--pool", type=int, default=16)
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--data-root", type=Path, default=default_data_root())
    parser.add_argument("--methods", type=lambda s: s.split(","), default=BASELINES + POOL_METHODS,
                        help="the comparison's methods; others already in --out are kept")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--parts", type=lambda s: s.split(","), default=PARTS,
                        help="which parts to run; the others are kept from an earlier run's JSON")
    parser.add_argument("--out", type=Path, default=RESULTS / "beyond.json")
    parser.add_argument("--figure", type=Path, default=DOCS / "beyond-curve.png", help="the curve's PNG")
    args = parser.parse_args()
    lm = load_model("default", args.device, args.dtype)
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result.setdefault("config", {})[",".join(args.parts)] = {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | {
        "model": lm.name, "dtype": str(lm.dtype).removeprefix("torch."), "device": str(lm.device)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for ds in args.datasets if "compare" in args.parts else []:  # saved per dataset: a long run keeps its parts
        for m, row in compare(lm, args.data_root, [ds], args.seeds, args.limit, args.pool, args.methods)[ds].items():
            result.setdefault("compare", {}).setdefault(ds, {})[m] = row
        args.out.write_text(json.dumps(result, indent=1))
    for ds in args.datasets if "curve" in args.parts else []:
        result.setdefault("curve", {}).update(curve(lm, args.data_root, [ds], args.seeds, args.limit, args.sizes))
        args.out.write_text(json.dumps(result, indent=1))
    if "curve" in args.parts:
        args.figure.write_bytes(plot_curve(result["curve"], args.sizes))
    if "latency" in args.parts:
        result["latency"] = latency(lm, args.data_root, args.repeats, args.pool)
    args.out.write_text(json.dumps(result, indent=1))
    rows = result.get("compare", {}).values()
    if rows and all(set(BASELINES + POOL_METHODS) <= set(row) for row in rows):
        sys.stdout.write(markdown(result) + "\n")
    sys.stdout.write(json.dumps(result.get("latency")) + "\n")


if __name__ == "__main__":
    main()
