"""Engine throughput with the engine's own API: the padded forward (one task per batch) in float32
and bfloat16, against the packed forward the server runs, at batch 1 and 32.

    python -m bench.engine --repeats 7        # bench/results/engine.json, prints markdown

SST-2 test sentences, the SST-2 template, one demonstration per class (seed 42), Hidden_anchor.
The variants run interleaved, their order rotating each repeat, so machine noise hits them alike;
medians over repeats. "padded" is `label_logits(last_hidden(...))`; "packed" is
`packed_label_logits` (anchor_cache/packed.py).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from anchor_cache.classifier import Classifier
from anchor_cache.data import read_jsonl, sample_rows, seed_demonstrations
from anchor_cache.forward import label_logits, last_hidden
from anchor_cache.models import load_model
from anchor_cache.packed import packed_label_logits
from anchor_cache.task import PRESETS, TaskSpec
from bench.common import RESULTS, dataset_parser


def variants(data_root, dtypes: list[str]) -> tuple[dict[str, Callable], list[list[int]]]:
    template, labels = PRESETS["sst2"]
    demos, _ = seed_demonstrations(read_jsonl(data_root / "sst2" / "train.jsonl", labels), labels, 1, 42)
    spec = TaskSpec(name="sst2", template=template, labels=labels, demonstrations=demos)
    fns: dict[str, Callable] = {}
    queries: list[list[int]] = []
    for dtype in dtypes:
        lm = load_model("default", "cpu", dtype)
        clf = Classifier(lm, spec)
        prefix = clf.prefix("hidden_anchor")
        queries = clf.encode([r.text for r in sample_rows(read_jsonl(data_root / "sst2" / "test.jsonl", labels),
                                                          64, 42)])

        def padded(qs, lm=lm, clf=clf, prefix=prefix):
            return label_logits(lm, last_hidden(lm, prefix, qs), clf.prompt.label_ids)

        def packed(qs, lm=lm, clf=clf):
            return packed_label_logits(lm, [clf.packed_row(q, "hidden_anchor") for q in qs])

        fns[f"padded {dtype}"] = padded
        if dtype == "bfloat16":
            fns[f"packed {dtype}"] = packed
    return fns, queries


def main() -> None:
    parser = dataset_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--singles", type=int, default=16, help="batch-1 queries timed per repeat")
    args = parser.parse_args()
    fns, queries = variants(args.data_root, ["float32", "bfloat16"])
    batches, singles = [queries[:32], queries[32:64]], queries[: args.singles]
    times: dict[str, dict[int, list[float]]] = {name: {1: [], 32: []} for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn(batches[0])  # warm-up
        for rep in range(args.repeats):
            order = list(fns)[rep % len(fns):] + list(fns)[: rep % len(fns)]
            for name in order:
                start = time.perf_counter()
                for q in singles:
                    fns[name]([q])
                times[name][1].append((time.perf_counter() - start) / len(singles))
                start = time.perf_counter()
                for b in batches:
                    fns[name](b)
                times[name][32].append((time.perf_counter() - start) / len(batches))
    result = {"config": vars(args) | {"data_root": str(args.data_root), "command": " ".join(sys.argv),
                                      "tokens_per_batch": [sum(map(len, b)) for b in batches]},
              "variants": {name: {str(b): {"median_ms": 1000 * statistics.median(t), "req_s": b / statistics.median(t),
                                           "repeats_ms": [round(1000 * x, 1) for x in t]}
                                  for b, t in by_batch.items()} for name, by_batch in times.items()}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "engine.json").write_text(json.dumps(result, indent=1))
    base = result["variants"]["padded bfloat16"]
    lines = ["| variant | batch 1 ms | batch 1 req/s | batch 32 ms | batch 32 req/s | batch 32 vs padded bf16 |",
             "|---|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        lines.append(f"| {name} | {v['1']['median_ms']:.1f} | {v['1']['req_s']:.1f} | {v['32']['median_ms']:.0f} | "
                     f"{v['32']['req_s']:.1f} | {v['32']['req_s'] / base['32']['req_s']:.2f}× |")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
