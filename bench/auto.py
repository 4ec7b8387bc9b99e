"""`method: auto`, its accuracy estimate, and class priors on the development sets.

    python -m bench.auto --seeds 42,43,44,45,46 --limit 300      # bench/results/auto.json, a markdown table
    python -m bench.auto --report auto.json auto-seeds-45-46.json    # one table from runs of other seeds

Per dataset and seed (the eval's own code, anchor_cache/evaluate.py): one demonstration per class,
a pool of 16 labelled rows per class (β learned on the same rows, 16 a step), and every candidate
of `auto` scored on `--limit` test rows. `auto` is the candidate cross-validation on the pool chose;
its estimate's 95% interval is checked against the test accuracy, and so is the interval for as
many rows as the test has (`Estimate.for_rows`: the test rows' own spread added), and so is the
estimate a server makes from the test rows' served probabilities as its traffic (anchor_cache/traffic.py;
recorded from the runs that keep their predictions), and the time the choice took
(its cross-validation: what a task created with `method: auto` waits for in its build job) is
recorded per seed. Class priors: bench/priors.py.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from anchor_cache.auto import CANDIDATES, Estimate
from anchor_cache.models import load_model
from anchor_cache.reweighting import pool_config
from anchor_cache.task import Method
from bench.common import RESULTS, dataset_parser, evaluate_each, merged_results
from bench.tables import cell


def run(lm, args: argparse.Namespace) -> None:
    for name, result in evaluate_each(lm, args, args.out, methods=["auto"], train_per_class=16, pool_per_class=16,
                                      reweight=pool_config(Method.HIDDEN_ANCHOR)):
        sys.stdout.write(markdown({name: result}) + "\n")
        sys.stdout.flush()


def _covers_test_rows(seed: dict) -> bool:
    return Estimate(**seed["estimate"]).covers(seed["accuracy"] / 100, seed["n"])


def markdown(results: dict) -> str:
    """Per dataset: each candidate's accuracy, auto's, what it chose, how often the estimate's interval,
    the interval for the test's rows and the estimate on the test rows cover the test accuracy, and the seconds its
    cross-validation took per seed."""
    names = [*(c.name for c in CANDIDATES), "auto"]
    lines = ["| dataset | " + " | ".join(names) + " | auto chose | interval covers | interval for the test rows "
             "covers | estimate on the test rows covers | CV seconds |",
             "|---|" + "---|" * (len(names) + 5)]
    for dataset, result in results.items():
        methods = result["methods"]
        cells = [cell([s["accuracy"] for s in methods[n]["per_seed"]], 1) for n in names]
        seeds = methods["auto"]["per_seed"]
        chose = ", ".join(f"{name} ×{n}" for name, n in Counter(s["chosen"] for s in seeds).most_common())
        covers = f"{sum(s['estimate_covers'] for s in seeds)}/{len(seeds)}"
        covers_rows = f"{sum(map(_covers_test_rows, seeds))}/{len(seeds)}"
        on_test = [s["traffic_covers"] for s in seeds if "traffic_covers" in s]
        covers_traffic = f"{sum(on_test)}/{len(on_test)}" if on_test else "–"
        seconds = cell([s["cv_seconds"] for s in seeds], 1)
        lines.append(f"| {dataset} | " + " | ".join(cells) + f" | {chose} | {covers} | {covers_rows} | "
                     f"{covers_traffic} | {seconds} |")
    return "\n".join(lines)


def main() -> None:
    parser = dataset_parser(__doc__)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[42, 43, 44, 45, 46])
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--out", default="auto.json")
    parser.add_argument("--report", nargs="+", metavar="FILE",
                        help="the table from these results files in bench/results, their seeds merged, without running")
    args = parser.parse_args()
    if args.report:
        sys.stdout.write(markdown(merged_results(args.report)) + "\n")
        return
    RESULTS.mkdir(exist_ok=True)
    run(load_model(args.model, "auto", args.dtype), args)


if __name__ == "__main__":
    main()
