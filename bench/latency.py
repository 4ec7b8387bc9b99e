"""Batch-1 latency of Hidden_anchor vs vanilla ICL, a prefix cache and zero-shot (paper Table 3).

    python -m bench.latency --queries 60      # writes bench/results/latency.json, prints markdown

All methods run in one process on the same queries, interleaved query by query (the order rotates),
so machine noise hits them alike; medians are reported. "prefix_cache" keeps the K/V of every
context token (what a prefix-caching server such as vLLM/SGLang holds), so it is vanilla ICL
without re-encoding the demonstrations. As in the paper, building caches is not timed.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from anchor_cache.cache import build_anchor_cache
from anchor_cache.classifier import Classifier
from anchor_cache.data import read_jsonl, sample_rows, seed_demonstrations
from anchor_cache.forward import Prefix, label_logits, last_hidden
from anchor_cache.models import load_model
from anchor_cache.task import PRESETS, TaskSpec
from bench.common import RESULTS, dataset_parser

METHODS = ["vanilla", "prefix_cache", "hidden_anchor", "zero_shot"]


def measure(lm, data_root: Path, name: str, n_queries: int, seed: int) -> dict:
    template, labels = PRESETS[name]
    train = read_jsonl(data_root / name / "train.jsonl", labels)
    demos, _ = seed_demonstrations(train, labels, 1, seed)
    clf = Classifier(lm, TaskSpec(name=name, template=template, labels=labels, demonstrations=demos))
    ctx = clf.prompt.context
    prefixes = {
        "vanilla": clf.prefix("vanilla"),
        "prefix_cache": Prefix(
            cache=build_anchor_cache(lm, ctx.ids, [True] * len(ctx.ids), ctx.label_positions, ctx.classes)
        ),
        "hidden_anchor": clf.prefix("hidden_anchor"),
        "zero_shot": clf.prefix("zero_shot"),
    }
    queries = [clf.prompt.encode(r.text) for r in sample_rows(read_jsonl(data_root / name / "test.jsonl", labels),
                                                               n_queries, seed)]
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    with torch.inference_mode():
        for i, query in enumerate(queries[:5] + queries):
            for m in METHODS[i % len(METHODS):] + METHODS[: i % len(METHODS)]:
                start = time.perf_counter()
                label_logits(lm, last_hidden(lm, prefixes[m], [query]), clf.prompt.label_ids).argmax(-1).item()
                if i >= 5:  # the first five are warm-up
                    times[m].append(time.perf_counter() - start)
    median = {m: 1000 * statistics.median(t) for m, t in times.items()}
    anchor_bytes = prefixes["hidden_anchor"].kv_bytes
    full_bytes = prefixes["prefix_cache"].kv_bytes
    return {
        "dataset": name,
        "queries": len(queries),
        "l_demo": len(ctx.ids),
        "l_anchor": prefixes["hidden_anchor"].cache.num_tokens,
        "l_x": statistics.mean(len(q) for q in queries),
        "median_ms": median,
        "speedup_vs_vanilla": median["vanilla"] / median["hidden_anchor"],
        "speedup_vs_prefix_cache": median["prefix_cache"] / median["hidden_anchor"],
        "hidden_anchor_over_zero_shot": median["hidden_anchor"] / median["zero_shot"],
        "anchor_cache_bytes": anchor_bytes,
        "prefix_cache_bytes": full_bytes,
        "memory_ratio": full_bytes / anchor_bytes,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| dataset | L_demo → anchors | L_x | vanilla ms | prefix cache ms | hidden_anchor ms | zero-shot ms | "
        "speed-up vs vanilla | vs prefix cache | HA / zero-shot | anchor cache | full prefix cache | smaller by |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = r["median_ms"]
        lines.append(
            f"| {r['dataset']} | {r['l_demo']} → {r['l_anchor']} | {r['l_x']:.1f} | {ms['vanilla']:.1f} | "
            f"{ms['prefix_cache']:.1f} | {ms['hidden_anchor']:.1f} | {ms['zero_shot']:.1f} | "
            f"{r['speedup_vs_vanilla']:.2f}× | {r['speedup_vs_prefix_cache']:.2f}× | "
            f"{r['hidden_anchor_over_zero_shot']:.3f} | {r['anchor_cache_bytes'] / 2**20:.2f} MiB | "
            f"{r['prefix_cache_bytes'] / 2**20:.2f} MiB | {r['memory_ratio']:.1f}× |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = dataset_parser(__doc__)
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    lm = load_model(args.model, "auto", args.dtype)
    rows = [measure(lm, args.data_root, name, args.queries, args.seed) for name in args.datasets]
    RESULTS.mkdir(exist_ok=True)
    meta = {"model": lm.name, "dtype": str(lm.dtype), "device": str(lm.device), "threads": torch.get_num_threads()}
    (RESULTS / "latency.json").write_text(json.dumps({"config": vars(args) | meta, "rows": rows}, indent=1,
                                                     default=str))
    sys.stdout.write(markdown(rows) + "\n")


if __name__ == "__main__":
    main()
