"""How far a linear head on this model's features can go at 16 rows per class: issue 21's +8 target.

    python -m bench.head_bound --seeds 42,43,44,45,46     # bench/results/head-bound.json, a markdown table

Per dataset and seed, the eval's own draws (one demonstration per class, a pool of 16 labelled rows
per class, β learned on it at 16 a step, 200 test rows): every layer's hidden state at the last
token and averaged over the row's tokens, under the pool's β, for the pool and the test rows. Then,
on those features:
- the served head (`fit_linear_head` as `linear_head` fits it);
- shrinkage LDA, another linear head of the same serving cost: on either of the served head's layer
  choices, with or without the label words' log-probabilities (scaled 3), shrunk towards a scaled
  identity by α ∈ {0.5, 0.8, 0.95}: twelve variants, chosen on the pool by 8-fold cross-validation
  (temperature-scaled log loss, as `auto` scores, and accuracy);
- two oracles, chosen on the test rows themselves, which no method can do: the best of the twelve
  LDA variants, and the best logistic head on one layer's state (last token or mean, from a third
  of the depth up). They bound what choosing among such heads could give.
The baseline is the issue's: max(zero-shot, β + Hidden_anchor). The pool's rows also taught β, so
cross-validation here sees features fitted to them; it compares the heads, not the estimate.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

from anchor_cache.auto import fit_temperature, log_loss, rescaled
from anchor_cache.classifier import Classifier
from anchor_cache.data import read_jsonl, sample_rows, seed_demonstrations, training_draw
from anchor_cache.heads import (
    FeatureLayers,
    Features,
    LinearDesign,
    fit_linear_head,
    linear_choices,
    linear_layers,
    select_layers,
)
from anchor_cache.models import load_model
from anchor_cache.reweighting import pool_config, train_reweighting
from anchor_cache.task import PRESETS, Method, TaskSpec
from bench.common import RESULTS, dataset_parser, write_result
from bench.tables import cell

POOL_PER_CLASS = 16
TEST_ROWS = 200
ALPHAS = (0.5, 0.8, 0.95)
LABEL_SCALES = (0.0, 3.0)
FOLDS = 8


def log_softmax(scores: np.ndarray | torch.Tensor) -> np.ndarray:
    return torch.log_softmax(torch.as_tensor(scores).float(), -1).numpy()


def fit_lda(x: np.ndarray, y: np.ndarray, n_classes: int, alpha: float):
    """Shrinkage LDA: Σ = (1 − α)·S_w + α·(tr S_w / F)·I, solved in the pool's principal coordinates
    (class means lie in the rows' span, where Σ⁻¹ keeps them, so this equals LDA on all F columns);
    returns the rows' (N, C) scores."""
    design = LinearDesign.fit(x)
    z = design.coordinates(x)
    means = np.stack([z[y == k].mean(0) for k in range(n_classes)])
    within = (z - means[y]).T @ (z - means[y]) / len(y)
    sigma = (1 - alpha) * within + alpha * np.trace(within) / x.shape[1] * np.eye(len(within))
    weight = np.linalg.solve(sigma, means.T).T
    bias = -0.5 * np.sum(weight * means, 1) + np.log(np.bincount(y, minlength=n_classes) / len(y))
    return lambda rows: design.coordinates(rows) @ weight.T + bias


def run_seed(lm, data_root: Path, name: str, seed: int) -> dict[str, float]:
    template, labels = PRESETS[name]
    root = data_root / name
    train, test = read_jsonl(root / "train.jsonl", labels), read_jsonl(root / "test.jsonl", labels)
    demos, used = seed_demonstrations(train, labels, 1, seed)
    pool, rows = training_draw(train, used, len(labels), POOL_PER_CLASS, seed), sample_rows(test, TEST_ROWS, seed)
    clf = Classifier(lm, TaskSpec(name="bound", template=template, labels=labels, demonstrations=demos), seed=seed)
    texts, y = [r.text for r in pool], np.array([r.label for r in pool])
    test_texts, gold = [r.text for r in rows], np.array([r.label for r in rows])
    beta = train_reweighting(clf, texts, y.tolist(), replace(pool_config(Method.HIDDEN_ANCHOR), seed=seed),
                             progress=False).beta
    depth, n_classes = lm.num_layers, len(labels)
    every = FeatureLayers(tuple(range(depth + 1)), tuple(range(depth + 1)))
    pool_f, test_f = (clf.features(t, Method.HIDDEN_ANCHOR, every, beta) for t in (texts, test_texts))

    def part(features: Features, layers: FeatureLayers) -> Features:
        return select_layers(features, every, layers)

    def accuracy(scores) -> float:
        return 100 * float((np.asarray(scores).argmax(1) == gold).mean())

    out = {"zero_shot": accuracy(clf.label_logits(test_texts, Method.ZERO_SHOT)),
           "hidden_anchor_reweighted": accuracy(test_f.label_logits)}
    served_layers = linear_layers(depth)
    head = fit_linear_head(part(pool_f, served_layers), y, n_classes, served_layers, linear_choices(depth))
    out["linear_head"] = accuracy(head.scores(part(test_f, head.layers)))

    split = list(StratifiedKFold(FOLDS, shuffle=True, random_state=0).split(y, y))
    pool_lp, test_lp = log_softmax(pool_f.label_logits), log_softmax(test_f.label_logits)
    variants = []  # (temperature-scaled CV log loss, CV accuracy, test accuracy)
    for layers in linear_choices(depth):
        for scale in LABEL_SCALES:
            x = np.hstack([part(pool_f, layers).hidden.numpy(), scale * pool_lp])
            x_test = np.hstack([part(test_f, layers).hidden.numpy(), scale * test_lp])
            for alpha in ALPHAS:
                held = np.zeros((len(y), n_classes))
                for fit_rows, held_rows in split:
                    held[held_rows] = log_softmax(fit_lda(x[fit_rows], y[fit_rows], n_classes, alpha)(x[held_rows]))
                tested = accuracy(fit_lda(x, y, n_classes, alpha)(x_test))
                variants.append((log_loss(rescaled(held, fit_temperature(held, y)), y),
                                 float((held.argmax(1) == y).mean()), tested))
    out["lda_by_log_loss"] = min(variants)[2]
    out["lda_by_accuracy"] = max(variants, key=lambda v: (v[1], -v[0]))[2]
    out["lda_oracle"] = max(v[2] for v in variants)
    singles = []
    for i in range(depth // 3, depth + 1):
        for layers in (FeatureLayers(last=(i,)), FeatureLayers(mean=(i,))):
            one = fit_linear_head(part(pool_f, layers), y, n_classes, layers, label_weight=head.chosen_label_weight)
            singles.append(accuracy(one.scores(part(test_f, layers))))
    out["one_layer_oracle"] = max(singles)
    return out


COLUMNS = ("zero_shot", "hidden_anchor_reweighted", "linear_head", "lda_by_log_loss", "lda_by_accuracy",
           "lda_oracle", "one_layer_oracle")


def markdown(results: dict[str, list[dict[str, float]]]) -> str:
    """Accuracy per dataset, mean ± sd over seeds, and each column's mean gain over the baseline."""
    lines = ["| dataset | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    gains = {c: [] for c in COLUMNS}
    for dataset, seeds in results.items():
        lines.append(f"| {dataset} | " + " | ".join(cell([s[c] for s in seeds], 1) for c in COLUMNS) + " |")
        base = statistics.mean(max(s["zero_shot"], s["hidden_anchor_reweighted"]) for s in seeds)
        for c in COLUMNS:
            gains[c].append(statistics.mean(s[c] for s in seeds) - base)
    lines.append("| mean over datasets − max(zero-shot, β + Hidden_anchor) | "
                 + " | ".join(f"{statistics.mean(g):+.1f}" for g in gains.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = dataset_parser(__doc__)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[42, 43, 44, 45, 46])
    parser.add_argument("--out", default="head-bound.json")
    args = parser.parse_args()
    lm = load_model(args.model, "auto", args.dtype)
    results: dict[str, list[dict[str, float]]] = {}
    for name in args.datasets:
        for seed in args.seeds:
            results.setdefault(name, []).append({"seed": seed, **run_seed(lm, args.data_root, name, seed)})
            sys.stderr.write(f"{name} seed {seed}: {results[name][-1]}\n")
    write_result(RESULTS / args.out, {"command": " ".join(sys.argv), "results": results}, markdown(results))


if __name__ == "__main__":
    main()
