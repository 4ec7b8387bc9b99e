"""Paper Table 2 analogue: every method on the four datasets, one JSON per dataset.

    python -m bench.compression --limit 200 --seeds 42,43,44,45,46   # writes bench/results/compression-*.json
    python -m bench.compression --report                              # prints the markdown summary only

Each dataset runs through the same `evaluate` as `python -m anchor_cache eval`; the summary
averages the per-dataset means, as the paper does.
"""

from __future__ import annotations

import argparse
import json
import sys

from anchor_cache.evaluate import EvalConfig, evaluate
from anchor_cache.models import load_model
from anchor_cache.task import PRESETS, Method
from bench.common import DATASETS, RESULTS, dataset_parser

METRICS = ("accuracy", "label_loyalty", "word_loyalty")


def run(args: argparse.Namespace) -> None:
    lm = load_model(args.model, "auto", args.dtype)
    for name in args.datasets:
        template, labels = PRESETS[name]
        cfg = EvalConfig(
            data=args.data_root / name, template=template, labels=labels, methods=list(Method),
            shots_per_class=1, seeds=args.seeds, limit=args.limit, top_draws=args.top_draws,
            top_dev_size=args.top_dev_size,
        )
        results = evaluate(lm, cfg)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"compression-{name}.json").write_text(json.dumps(results, indent=1))


def report() -> str:
    per_dataset = {
        name: json.loads((RESULTS / f"compression-{name}.json").read_text())
        for name in DATASETS
        if (RESULTS / f"compression-{name}.json").is_file()
    }
    if not per_dataset:
        return "no results yet"
    cfg = next(iter(per_dataset.values()))["config"]
    lines = [
        f"{cfg['model']} ({cfg['dtype']}), {cfg['shots_per_class']} demonstration per class, seeds "
        f"{','.join(map(str, cfg['seeds']))}, up to {cfg['limit']} test rows per seed; datasets: "
        f"{', '.join(per_dataset)}. Means over seeds; the last column averages the datasets.",
    ]
    for metric in METRICS:
        lines += ["", f"{metric.replace('_', ' ')} (%)", "",
                  "| method | " + " | ".join(per_dataset) + " | average |", "|---|" + "---|" * (len(per_dataset) + 1)]
        for method in (m.value for m in Method):
            values = [r["methods"][method][metric] for r in per_dataset.values()]
            lines.append(f"| {method} | " + " | ".join(f"{v:.2f}" for v in values)
                         + f" | **{sum(values) / len(values):.2f}** |")
    return "\n".join(lines)


def main() -> None:
    parser = dataset_parser(__doc__)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[42, 43, 44, 45, 46])
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--top-draws", type=int, default=20)
    parser.add_argument("--top-dev-size", type=int, default=100)
    parser.add_argument("--report", action="store_true", help="only print the summary of existing results")
    args = parser.parse_args()
    if not args.report:
        run(args)
    sys.stdout.write(report() + "\n")


if __name__ == "__main__":
    main()
