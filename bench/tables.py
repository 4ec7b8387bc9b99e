"""The paper-table sections of docs/RESULTS.md, with the spread across seeds, from the stored JSON.

    python -m bench.tables                  # every table, as markdown
    python -m bench.tables compression      # one section: compression | reweighting | analyses

Nothing is rerun. A cell is "mean ± sd": the mean over seeds and the sample standard deviation
(n − 1) of the per-seed values. A column that averages the datasets shows the mean of the
datasets' means, and the sd over seeds of the per-seed averages (every dataset ran the same seeds).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.common import RESULTS

ANALYSES = Path(__file__).parent.parent / "docs" / "analyses"
DATASETS = {"sst2": "SST-2", "trec": "TREC", "agnews": "AG News", "emoc": "EmoC"}
METHODS = ("vanilla", "hidden_anchor", "text_anchor", "hidden_random", "hidden_random_top", "zero_shot")
TABLE1 = {
    "vanilla": "Vanilla ICL (1-shot/class)",
    "vanilla_many_shot": "Vanilla ICL (5-shot/class; AG News 3-shot)",
    "vanilla_reweighted": "Anchor re-weighting, vanilla context (1-shot)",
    "hidden_anchor_reweighted": "Anchor re-weighting + Hidden_anchor (served)",
    "calibrated": "Contextual calibration (vanilla, 1-shot)",
    "hidden_anchor_reweighted_calibrated": "Calibration + re-weighting + Hidden_anchor",
}


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _mean(values: Sequence[float | None]) -> float | None:
    """The mean of the values that exist (an undefined AUC, say, is left out)."""
    ok = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.mean(ok) if ok else None


def cell(per_seed: Sequence[float | None], digits: int = 2, bold: bool = False, mean: float | None = None,
         signed: bool = False) -> str:
    """"mean ± sd" over the seeds that have a value; `mean` replaces the mean shown; `signed`: a + on
    a positive mean (a difference)."""
    values = [v for v in per_seed if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    shown = f"{statistics.mean(values) if mean is None else mean:{'+' if signed else ''}.{digits}f}"
    sd = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return (f"**{shown}**" if bold else shown) + sd


def across(columns: Sequence[Sequence[float | None]], digits: int = 2, bold: bool = False) -> str:
    """The cell of a column that averages datasets (each column a list over the same seeds)."""
    per_seed = [_mean(row) for row in zip(*columns, strict=True)]
    return cell(per_seed, digits, bold, mean=_mean([_mean(c) for c in columns]))


def _table(header: Sequence[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def compression() -> str:
    runs = {n: _load(RESULTS / f"compression-{n}.json") for n in DATASETS}
    seeds = {tuple(r["config"]["seeds"]) for r in runs.values()}
    assert len(seeds) == 1, f"datasets ran different seeds: {seeds}"
    out = []
    for metric in ("accuracy", "label_loyalty", "word_loyalty"):
        rows = []
        for method in METHODS:
            cols = [[s[metric] for s in r["methods"][method]["per_seed"]] for r in runs.values()]
            for col, r in zip(cols, runs.values(), strict=True):  # the stored mean is the mean of these
                assert abs(statistics.mean(col) - r["methods"][method][metric]) < 1e-6
            rows.append([method, *map(cell, cols), across(cols, bold=True)])
        out += [f"{metric.replace('_', ' ')} (%)", "", _table(["method", *runs, "average"], rows), ""]
    return "\n".join(out).strip()


def reweighting() -> str:
    runs = {n: _load(RESULTS / f"reweighting-{n}.json") for n in DATASETS}
    rows = []
    for key, label in TABLE1.items():
        part, method = ("many_shot", "vanilla") if key == "vanilla_many_shot" else ("one_shot", key)
        cols = [[s["accuracy"] for s in r[part]["methods"][method]["per_seed"]] for r in runs.values()]
        rows.append([label, *map(cell, cols), across(cols)])
    return _table(["method", *runs, "mean"], rows)


def _analysis(kind: str) -> dict[str, dict]:
    return {n: _load(ANALYSES / f"{kind}-{n}.json") for n in DATASETS}


def crossing(s_wp: Sequence[float], s_pq: Sequence[float]) -> str:
    """The first layer where S_pq exceeds S_wp, and the layer from which it stays above if that is later."""
    first = next(i for i, (w, q) in enumerate(zip(s_wp, s_pq, strict=True)) if q > w)
    stays = len(s_pq)
    while stays > 0 and s_pq[stays - 1] > s_wp[stays - 1]:
        stays -= 1
    return f"{first}" + (f" (again from {stays})" if stays > first else "")


def saliency() -> str:
    rows = []
    for name, r in _analysis("saliency").items():
        n = r["layers"]
        third = {"first": slice(0, n // 3), "last": slice(n - n // 3, n)}
        per_seed = list(r["per_seed"].values())
        cells = [cell([_mean(s[flow][third[where]]) for s in per_seed])
                 for where in ("first", "last") for flow in ("s_wp", "s_pq")]
        seeds = [crossing(s["s_wp"], s["s_pq"]) for s in per_seed]
        mean = crossing(r["s_wp"], r["s_pq"])
        agree = sum(c == mean for c in seeds)
        rows.append([DATASETS[name], *cells, f"{mean}; {agree} of {len(seeds)} seeds alike"])
    header = ["dataset", "S_wp, layers 0–9", "S_pq, layers 0–9", "S_wp, layers 20–29", "S_pq, layers 20–29",
              "first layer with S_pq > S_wp"]
    return _table(header, rows)


def isolation(k: str = "5") -> str:
    runs = _analysis("isolation")
    rows = []
    for where in ("first", "last"):
        for what in ("label", "random"):
            cells = [across([r["per_seed"][m][where][what][k] for r in runs.values()], digits=1)
                     for m in ("label_loyalty", "word_loyalty")]
            rows.append([f"{what} words, {where} {k} layers", *cells])
    return _table([f"isolated (k = {k})", "label loyalty", "word loyalty"], rows)


def deep_layers(block: int = 5) -> str:
    runs = _analysis("deep_layers")
    n = next(iter(runs.values()))["layers"]
    blocks = [slice(i, min(i + block, n)) for i in range(0, n, block)]
    per_block: dict[str, list[list[float | None]]] = {}  # dataset → block → per-seed block means
    rows = []
    for name, r in runs.items():
        curves = [[math.nan if a is None else a for a in s["auc_roc"]] for s in r["per_seed"].values()]
        per_block[name] = [[_mean(c[b]) for c in curves] for b in blocks]
        auc = [a for a in r["auc_roc"] if a is not None]
        rows.append([DATASETS[name], *map(cell, per_block[name]), f"{max(auc):.2f}"])
    rows.append(["mean", *(across([per_block[d][i] for d in runs]) for i in range(len(blocks))), ""])
    header = ["dataset", *(f"layers {b.start}–{b.stop - 1}" if i == 0 else f"{b.start}–{b.stop - 1}"
                           for i, b in enumerate(blocks)), "max (mean curve)"]
    return _table(header, rows)


SECTIONS = {
    "compression": compression,
    "reweighting": reweighting,
    "analyses": lambda: "\n\n".join([saliency(), isolation(), deep_layers()]),
}


def main(argv: list[str]) -> None:
    names = argv or list(SECTIONS)
    unknown = set(names) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"error: unknown section(s) {sorted(unknown)}; choose from {list(SECTIONS)}")
    sys.stdout.write("\n\n".join(f"<!-- {name} -->\n{SECTIONS[name]()}" for name in names) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
