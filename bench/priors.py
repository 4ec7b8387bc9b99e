"""Class priors on the development sets: the served head under `pool`, `uniform` and `adapt`.

    python -m bench.priors --seeds 42,43,44 --limit 600        # bench/results/priors.json
    python -m bench.priors --report priors.json priors-seeds-45-46.json   # one table from runs of other seeds

Per dataset and seed (anchor_cache/evaluate.py): one demonstration per class, a balanced pool of 16
rows per class (β learned on it, 16 a step), `linear_head` under that β (what a pool task serves)
and β + Hidden_anchor, scored on `--limit` test rows in the test file's own class mix. `adapt`
sees the rows as traffic, 16 at a time, as the server does: from `--min-samples` of them on, it
corrects when the shift it estimates is significant and large (anchor_cache/priors.py).
EmoC's test rows are 85% "Others"; the other sets are close to their pools' balance.
"""

from __future__ import annotations

import sys

import numpy as np

from anchor_cache.models import load_model
from anchor_cache.reweighting import pool_config
from anchor_cache.task import Method
from bench.common import dataset_parser, evaluate_each, merged_results
from bench.tables import cell

PRIORS = ["pool", "uniform", "adapt"]
METHODS = ["linear_head_reweighted", "hidden_anchor_reweighted"]


def table_rows(name: str, result: dict) -> list[str]:
    """Per method: accuracy under each prior, and adapt's gain over pool with its range over seeds."""
    lines = []
    for method in METHODS:
        seeds = result["methods"][method]["per_seed"]
        cells = [cell([s["accuracy_by_prior"][p] for s in seeds], digits=1) for p in PRIORS]
        gain = [s["accuracy_by_prior"]["adapt"] - s["accuracy_by_prior"]["pool"] for s in seeds]
        lines.append(f"| {name} | {method} | " + " | ".join(cells)
                     + f" | {np.mean(gain):+.1f} ({min(gain):+.1f} to {max(gain):+.1f}) | {len(seeds)} |")
    return lines


def main() -> None:
    parser = dataset_parser(__doc__)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[42, 43, 44])
    parser.add_argument("--limit", type=int, default=600)
    parser.add_argument("--min-samples", type=int, default=200)
    parser.add_argument("--out", default="priors.json")
    parser.add_argument("--report", nargs="+", metavar="FILE",
                        help="the table from these results files in bench/results, their seeds merged, without running")
    args = parser.parse_args()
    header = ["| dataset | method | " + " | ".join(f"`{p}`" for p in PRIORS) + " | `adapt` − `pool` (range) | seeds |",
              "|---|---|" + "---|" * (len(PRIORS) + 2)]
    if args.report:
        lines = header + [row for name, result in merged_results(args.report).items()
                          for row in table_rows(name, result)]
        sys.stdout.write("\n".join(lines) + "\n")
        return
    lm = load_model(args.model, "auto", args.dtype)
    sys.stdout.write("\n".join(header) + "\n")
    for name, result in evaluate_each(lm, args, args.out, methods=METHODS, train_per_class=16, pool_per_class=16,
                                      reweight=pool_config(Method.HIDDEN_ANCHOR), priors=PRIORS,
                                      prior_min_samples=args.min_samples):
        sys.stdout.write("\n".join(table_rows(name, result)) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
