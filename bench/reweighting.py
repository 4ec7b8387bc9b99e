"""Anchor re-weighting: the paper's Table 1 analogue, β's serving overhead and training time.

    python -m bench.reweighting --table --limit 200      # Table 1 rows per dataset (slow: trains β per seed)
    python -m bench.reweighting --overhead               # latency with/without β, batch 1 and 16; training time
    python -m bench.reweighting --report                 # Table 1 markdown from the per-dataset JSON files
    python -m bench.reweighting --batched 8 --lr 0.05    # β at batch 1 (the paper's) against batch 8: time, accuracy
    python -m bench.reweighting --batched-report reweighting-batched.json   # its table (several files: seeds merged)

Table 1 rows: vanilla 1-shot, vanilla 5-shot (AG News 3-shot), re-weighting in a vanilla context,
re-weighting + Hidden_anchor (what is served), calibration, calibration + re-weighting + Hidden_anchor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from anchor_cache.classifier import Classifier
from anchor_cache.data import read_jsonl, sample_rows, seed_demonstrations, training_draw
from anchor_cache.evaluate import EvalConfig, evaluate
from anchor_cache.models import load_model
from anchor_cache.reweighting import TrainConfig, train_reweighting
from anchor_cache.task import PRESETS, Method, TaskSpec
from bench.common import RESULTS, dataset_parser
from bench.tables import cell

TABLE_METHODS = ["vanilla", "vanilla_reweighted", "hidden_anchor_reweighted", "calibrated",
                 "hidden_anchor_reweighted_calibrated"]
MANY_SHOTS = {"agnews": 3}  # the paper's 5-shot row uses 3 shots on AG News (prompt length)


def table(lm, args: argparse.Namespace) -> dict:
    out = {}
    for name in args.datasets:
        template, labels = PRESETS[name]
        base = dict(data=args.data_root / name, template=template, labels=labels, seeds=args.seeds, limit=args.limit)
        one_shot = evaluate(lm, EvalConfig(methods=TABLE_METHODS, shots_per_class=1, **base))
        many = evaluate(lm, EvalConfig(methods=["vanilla"], shots_per_class=MANY_SHOTS.get(name, 5), **base))
        out[name] = {m: one_shot["methods"][m]["accuracy"] for m in TABLE_METHODS}
        out[name]["vanilla_many_shot"] = many["methods"]["vanilla"]["accuracy"]
        (RESULTS / f"reweighting-{name}.json").write_text(json.dumps({"one_shot": one_shot, "many_shot": many}))
    return out


ROW_NAMES = {
    "vanilla": "Vanilla ICL (1-shot/class)",
    "vanilla_many_shot": "Vanilla ICL (5-shot/class; AG News 3-shot)",
    "vanilla_reweighted": "Anchor re-weighting, vanilla context (1-shot)",
    "hidden_anchor_reweighted": "Anchor re-weighting + Hidden_anchor (served)",
    "calibrated": "Contextual calibration (vanilla, 1-shot)",
    "hidden_anchor_reweighted_calibrated": "Calibration + re-weighting + Hidden_anchor",
}


def report(datasets: list[str]) -> str:
    """Table 1 rows × the datasets whose results exist, with the mean and the test rows per seed."""
    found = {n: json.loads((RESULTS / f"reweighting-{n}.json").read_text()) for n in datasets
             if (RESULTS / f"reweighting-{n}.json").exists()}
    accuracy = {n: {m: v["accuracy"] for m, v in r["one_shot"]["methods"].items()}
                | {"vanilla_many_shot": r["many_shot"]["methods"]["vanilla"]["accuracy"]} for n, r in found.items()}
    rows_per_seed = ", ".join(f"{n} {r['one_shot']['config']['limit']}" for n, r in found.items())
    lines = [f"| method | {' | '.join(found)} | mean |", "|---|" + "---|" * (len(found) + 1)]
    for key, label in ROW_NAMES.items():
        values = [accuracy[n][key] for n in found]
        lines.append(f"| {label} | {' | '.join(f'{v:.2f}' for v in values)} | {statistics.mean(values):.2f} |")
    gain = statistics.mean(accuracy[n]["hidden_anchor_reweighted"] - accuracy[n]["vanilla"] for n in found)
    lines.append(f"\nre-weighting + Hidden_anchor − vanilla 1-shot: {gain:+.2f} points (test rows per seed: "
                 f"{rows_per_seed})")
    return "\n".join(lines)


def batched_report(files: list[str]) -> str:
    """The batched-against-batch-1 table from `batched` results files (runs of other seeds merged):
    per dataset, the median seconds of each, the speed-up's median and range, and each accuracy and
    their difference as mean ± standard deviation over seeds."""
    runs = [run for f in files for run in json.loads((RESULTS / f).read_text())["runs"]]
    lines = ["| dataset | rows | batch 1 (paper) | batched | speed-up (median, range) | accuracy, batch 1 | "
             "accuracy, batched | difference | seeds |", "|---|" + "---|" * 8]

    for name in dict.fromkeys(run["dataset"] for run in runs):
        mine = [run for run in runs if run["dataset"] == name]
        speedups = [run["speedup"] for run in mine]
        paper = [100 * run["paper"]["accuracy"] for run in mine]
        fast = [100 * run["batched"]["accuracy"] for run in mine]
        seconds = {key: statistics.median(run[key]["seconds"] for run in mine) for key in ("paper", "batched")}
        lines.append(
            f"| {name} | {mine[0]['train_examples']} | {seconds['paper']:.0f} s | {seconds['batched']:.0f} s | "
            f"{statistics.median(speedups):.2f}× ({min(speedups):.2f}–{max(speedups):.2f}) | {cell(paper, 1)} | "
            f"{cell(fast, 1)} | {cell([f - p for f, p in zip(fast, paper, strict=True)], 1, signed=True)} | "
            f"{len(mine)} |")
    speedups = [run["speedup"] for run in runs]
    gains = [100 * (run["batched"]["accuracy"] - run["paper"]["accuracy"]) for run in runs]
    lines.append(f"\nall {len(runs)} pairs: speed-up median {statistics.median(speedups):.2f}×, "
                 f"{sum(x >= 5 for x in speedups)} of {len(runs)} at 5× or more; accuracy "
                 f"{statistics.mean(gains):+.1f} points on average")
    return "\n".join(lines)


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def overhead(lm, args: argparse.Namespace, name: str = "agnews", seed: int = 42) -> dict:
    """β's cost at serving time, and how long training β takes for a 4-class task."""
    template, labels = PRESETS[name]
    train = read_jsonl(args.data_root / name / "train.jsonl", labels)
    demos, used = seed_demonstrations(train, labels, 1, seed)
    clf = Classifier(lm, TaskSpec(name=name, template=template, labels=labels, demonstrations=demos))
    rows = training_draw(train, used, len(labels), 4, seed)
    start = time.perf_counter()
    beta = train_reweighting(clf, [r.text for r in rows], [r.label for r in rows], progress=False).beta
    train_s = time.perf_counter() - start
    texts = [r.text for r in sample_rows(read_jsonl(args.data_root / name / "test.jsonl", labels), 16, seed)]
    result = {"dataset": name, "train_examples": len(rows), "train_seconds": train_s}
    with torch.inference_mode():
        for batch in (1, 16):
            part = texts[:batch]
            # Interleave plain and β runs so machine noise hits both alike.
            plain, weighted = [], []
            for _ in range(args.repeats):
                plain.append(_median_ms(lambda p=part: clf.label_logits(p, Method.HIDDEN_ANCHOR, 16), 1))
                weighted.append(_median_ms(lambda p=part: clf.label_logits(p, Method.HIDDEN_ANCHOR, 16, beta), 1))
            p_ms, w_ms = statistics.median(plain), statistics.median(weighted)
            result[f"batch_{batch}"] = {"plain_ms": p_ms, "beta_ms": w_ms, "ratio": w_ms / p_ms}
    return result


def _accuracy(clf: Classifier, rows: list, beta: torch.Tensor) -> float:
    with torch.inference_mode():
        logits = clf.label_logits([r.text for r in rows], Method.HIDDEN_ANCHOR, 32, beta)
    return float((logits.argmax(-1).cpu() == torch.tensor([r.label for r in rows])).float().mean())


def batched(lm, args: argparse.Namespace) -> dict:
    """β learned at the paper's batch 1 and at `args.batched`, side by side on each dataset and seed:
    16 labelled rows per class beside one demonstration per class, Hidden_anchor, test accuracy."""
    configs = {"paper": TrainConfig(), "batched": TrainConfig(batch_size=args.batched, lr=args.lr, epochs=args.epochs)}
    out: dict = {"configs": {k: vars(c) | {"method": str(c.method)} for k, c in configs.items()}, "runs": []}
    for name in args.datasets:
        template, labels = PRESETS[name]
        train = read_jsonl(args.data_root / name / "train.jsonl", labels)
        test = read_jsonl(args.data_root / name / "test.jsonl", labels)
        for seed in args.seeds:
            demos, used = seed_demonstrations(train, labels, 1, seed)
            clf = Classifier(lm, TaskSpec(name=name, template=template, labels=labels, demonstrations=demos))
            rows = training_draw(train, used, len(labels), 16, seed)
            held_out = sample_rows(test, args.limit, seed)
            run = {"dataset": name, "seed": seed, "train_examples": len(rows), "test_rows": len(held_out),
                   "zero_beta_accuracy": _accuracy(clf, held_out, clf.zero_beta())}
            for key, cfg in configs.items():  # alternating per seed would not help: each run is minutes
                result = train_reweighting(clf, [r.text for r in rows], [r.label for r in rows], cfg, progress=False)
                run[key] = {"seconds": round(result.seconds, 2), "accuracy": _accuracy(clf, held_out, result.beta),
                            "final_loss": result.epoch_losses[-1]}
            run["speedup"] = run["paper"]["seconds"] / run["batched"]["seconds"]
            out["runs"].append(run)
            sys.stdout.write(json.dumps(run) + "\n")
            sys.stdout.flush()
    return out


def main() -> None:
    parser = dataset_parser(__doc__)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[42, 43, 44, 45, 46])
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--overhead", action="store_true")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--batched", type=int, help="compare β at this batch size with the paper's batch 1")
    parser.add_argument("--lr", type=float, default=0.01, help="the batched run's learning rate")
    parser.add_argument("--epochs", type=int, default=10, help="the batched run's epochs")
    parser.add_argument("--out", default="reweighting-batched.json")
    parser.add_argument("--batched-report", nargs="+", metavar="FILE",
                        help="the batched runs' table from these results files in bench/results, without running")
    args = parser.parse_args()
    if args.report:
        sys.stdout.write(report(args.datasets) + "\n")
        return
    if args.batched_report:
        sys.stdout.write(batched_report(args.batched_report) + "\n")
        return
    lm = load_model(args.model, "auto", args.dtype)
    RESULTS.mkdir(exist_ok=True)
    if args.overhead:
        result = overhead(lm, args)
        (RESULTS / "reweighting-overhead.json").write_text(json.dumps(result, indent=1))
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
    if args.batched:
        (RESULTS / args.out).write_text(json.dumps(batched(lm, args), indent=1))
    if args.table:
        rows = table(lm, args)
        (RESULTS / "reweighting-table.json").write_text(json.dumps(rows, indent=1))
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
