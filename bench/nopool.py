"""A task without a pool: Hidden_anchor with and without contextual calibration.

    python -m bench.nopool --seeds 42,43,44 --limit 200      # bench/results/nopool.json

One demonstration per class, the eval's own code (vanilla runs beside them as every eval's reference).
"""

from __future__ import annotations

import sys

from anchor_cache.models import load_model
from bench.common import dataset_parser, evaluate_each

METHODS = ["hidden_anchor", "hidden_anchor_calibrated"]


def main() -> None:
    parser = dataset_parser(__doc__)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[42, 43, 44])
    parser.add_argument("--limit", type=int, default=200)
    args = parser.parse_args()
    lm = load_model(args.model, "auto", args.dtype)
    for name, result in evaluate_each(lm, args, "nopool.json", methods=METHODS):
        per_seed = {k: [round(s["accuracy"], 1) for s in v["per_seed"]] for k, v in result["methods"].items()}
        sys.stdout.write(f"{name} {per_seed}\n")


if __name__ == "__main__":
    main()
