"""The paper's analyses (§2, §3.3) on the four datasets: JSON and plots per run, plus a summary.

    python -m bench.analyses --limit 100 --isolation-limit 40 --out docs/analyses

Writes OUT/<kind>-<dataset>.json, OUT/<kind>-<dataset>.png, the averages over datasets
(OUT/isolation-average.png, OUT/deep_layers-average.png) and OUT/summary.json with the figures
RESULTS.md quotes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from anchor_cache.analysis import KINDS, AnalysisData, JobControl, parse_params, run_analysis
from anchor_cache.analysis.deep_layers import r_curve
from anchor_cache.analysis.plots import auc_plot, loyalty_plot
from anchor_cache.data import read_jsonl
from anchor_cache.models import load_model
from anchor_cache.task import PRESETS, DemonstrationSource, TaskSpec
from bench.common import dataset_parser


def _data(root: Path, name: str) -> AnalysisData:
    template, labels = PRESETS[name]
    demos = DemonstrationSource(path=root / name / "train.jsonl")
    return AnalysisData(
        task=TaskSpec(name=name, template=template, labels=labels, demonstrations=demos),
        test=read_jsonl(root / name / "test.jsonl", labels),
        train=read_jsonl(root / name / "train.jsonl", labels),
    )


def _summary(kind: str, r: dict) -> dict:
    """The numbers that carry each finding, from one run's results."""
    n = r.get("layers", 0)
    if kind == "saliency":
        wp, pq = np.array(r["s_wp"]), np.array(r["s_pq"])
        return {"s_wp_first_third": float(wp[: n // 3].mean()), "s_pq_first_third": float(pq[: n // 3].mean()),
                "s_wp_last_third": float(wp[-(n // 3):].mean()), "s_pq_last_third": float(pq[-(n // 3):].mean()),
                "first_layer_s_pq_exceeds_s_wp": int(np.argmax(pq > wp)) if (pq > wp).any() else None}
    if kind == "isolation":
        k = str(5 if 5 in r["ks"] else max(r["ks"]))
        return {f"{m}_{where}_{what}_k{k}": r[m][where][what][k] for m in ("label_loyalty", "word_loyalty")
                for where in ("first", "last") for what in ("label", "random")}
    if kind == "deep_layers":
        auc = np.array([np.nan if a is None else a for a in r["auc_roc"]])
        return {"auc_first_half": float(np.nanmean(auc[: n // 2])), "auc_second_half": float(np.nanmean(auc[n // 2:])),
                "auc_max": float(np.nanmax(auc)), "auc_last": float(auc[-1])}
    return {"spearman": r["spearman"], "layer": r["layer"], "accuracy": r["accuracy"]}


def main() -> None:
    parser = dataset_parser(__doc__)
    parser.add_argument("--kinds", type=lambda s: s.split(","), default=list(KINDS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[42, 43, 44, 45, 46])
    parser.add_argument("--limit", type=int, default=100, help="test rows per seed (error diagnosis: rows in all)")
    parser.add_argument("--isolation-limit", type=int, help="rows per seed for isolation (17 passes each)")
    parser.add_argument("--saliency-limit", type=int, help="rows per seed for saliency (a backward pass each)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("docs/analyses"))
    args = parser.parse_args()
    lm = load_model(args.model, args.device, args.dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"model": lm.name, "device": str(lm.device), "dtype": str(lm.dtype), "runs": {}}
    averaged: dict[str, list[dict]] = {}
    for kind in args.kinds:
        limit = {"isolation": args.isolation_limit, "saliency": args.saliency_limit}.get(kind) or args.limit
        params = {"limit": limit, "batch_size": args.batch_size}
        params |= {"seed": args.seeds[0]} if kind == "error_diagnosis" else {"seeds": args.seeds}
        for name in args.datasets:
            with tqdm(desc=f"{kind} {name}", unit="step", file=sys.stderr) as bar:
                def progress(done: int, total: int, bar: tqdm = bar) -> None:
                    bar.total = total
                    bar.update(done - bar.n)
                start = time.perf_counter()
                checked = parse_params(kind, params, lm.model.config.num_hidden_layers)
                out = run_analysis(lm, kind, _data(args.data_root, name), checked, JobControl(on_progress=progress))
            (args.out / f"{kind}-{name}.json").write_text(json.dumps(out.results, indent=1, allow_nan=False))
            for plot in out.plots.values():
                (args.out / f"{kind}-{name}.png").write_bytes(plot)
            summary["runs"][f"{kind}/{name}"] = _summary(kind, out.results) | {
                "seconds": round(time.perf_counter() - start, 1), "examples": out.results["examples"]}
            averaged.setdefault(kind, []).append(out.results)
            (args.out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
    if "isolation" in averaged and len(averaged["isolation"]) > 1:
        runs = averaged["isolation"]
        mean = {m: {w: {x: {k: float(np.mean([r[m][w][x][k] for r in runs])) for k in runs[0][m][w][x]}
                        for x in runs[0][m][w]} for w in runs[0][m]} for m in ("label_loyalty", "word_loyalty")}
        summary["isolation_average"] = _summary("isolation", mean | {"ks": runs[0]["ks"]})
        (args.out / "isolation-average.png").write_bytes(loyalty_plot(mean, "Isolation, mean of the datasets"))
    if "deep_layers" in averaged and len(averaged["deep_layers"]) > 1:
        auc = np.nanmean([[np.nan if a is None else a for a in r["auc_roc"]] for r in averaged["deep_layers"]], 0)
        summary["deep_layers_average"] = {"auc_roc": auc.tolist(), "r": r_curve(auc).tolist()}
        plot = auc_plot(auc, r_curve(auc), "Deep layers, mean of the datasets")
        (args.out / "deep_layers-average.png").write_bytes(plot)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
    sys.stdout.write(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
