"""Heads on anchor-context features: more labelled rows counted at Hidden_anchor's cost.

A text's features come from its own forward against the task's Hidden_anchor cache (the query's
forward, as served): hidden states of chosen layers at its last token and averaged over its tokens
(`FeatureLayers`), and the label-word logits that forward gives anyway. A head fitted on a labelled
pool turns them into class scores:

- `LinearHead`: logistic regression (scikit-learn, strong L2) on the standardised hidden features
  stacked with the label words' log-probabilities, with the standardisation folded into the
  weights, so serving it is one (C, F) and one (C, C) matmul. Deep-but-not-last layers carry more
  of what a class looks like than the final one, which is tuned to predict the next token; the
  label words carry what the context's demonstrations taught. How much they count (their scale
  against the unit-variance hidden features, hence against the L2 prior) is chosen on the pool by
  stratified cross-validation (log loss): on SST-2 the label words are the better half of the
  evidence, on TREC they mislead.
- `KnnHead`: cosine k-nearest neighbours among the pool's final hidden states (kNN Prompting's
  idea on hidden states rather than label-word distributions); scores are the log of smoothed
  similarity-weighted neighbour votes.

Both give (N, C) scores whose argmax is the prediction and whose softmax reads as probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.preprocessing import StandardScaler

from anchor_cache.errors import ValidationError

LINEAR_C = 0.01  # inverse L2 strength: a few rows per class in thousands of dimensions need a strong prior
LABEL_WEIGHTS = (0.0, 3.0, 10.0)  # scales of the label log-probs against unit-variance hidden features
CV_FOLDS = 4
LAST_DEPTH, MEAN_DEPTH = 0.8, 0.53  # fractions of the model's depth read at the last token / averaged
KNN_K = 8


@dataclass(frozen=True)
class FeatureLayers:
    """Hidden-state indices a head reads: 0 is the embeddings, L (the model's depth) the final-norm
    output; `last` at the row's last token, `mean` averaged over the row's tokens."""

    last: tuple[int, ...] = ()
    mean: tuple[int, ...] = ()


def linear_layers(num_layers: int) -> FeatureLayers:
    """The linear head's layers for a model `num_layers` deep."""
    return FeatureLayers(last=(round(LAST_DEPTH * num_layers), num_layers), mean=(round(MEAN_DEPTH * num_layers),))


def final_layer(num_layers: int) -> FeatureLayers:
    return FeatureLayers(last=(num_layers,))


def read_features(
    hidden_states: Sequence[torch.Tensor], first: torch.Tensor, last: torch.Tensor, layers: FeatureLayers
) -> torch.Tensor:
    """(B, F) float32 features of B rows of a packed sequence: `hidden_states[i]` is (T, H) after
    layer i (the last one final-normed), rows span tokens [first, last]."""
    parts = [hidden_states[i][last].float() for i in layers.last]
    counts = (last - first + 1).float()[:, None]
    for i in layers.mean:
        sums = torch.nn.functional.pad(torch.cumsum(hidden_states[i].float(), dim=0), (0, 0, 1, 0))  # sums[t]: < t
        parts.append((sums[last + 1] - sums[first]) / counts)
    return torch.cat(parts, dim=-1)


@dataclass(frozen=True)
class Features:
    """What a head reads of a forward, per row."""

    hidden: torch.Tensor  # (N, F) the head's layers, as read_features lays them out
    label_logits: torch.Tensor  # (N, C) the task's label-word logits of the same forward


def _check(n_features: int, labels: np.ndarray, n_classes: int) -> None:
    if n_features != len(labels) or len(labels) == 0:
        raise ValidationError(f"a head needs labelled rows: got {n_features} features and {len(labels)} labels")
    missing = sorted(set(range(n_classes)) - set(labels.tolist()))
    if missing:
        raise ValidationError(f"the labelled pool has no row of classes {missing}; every class needs at least one")


@dataclass(frozen=True)
class LinearHead:
    layers: FeatureLayers
    weight: torch.Tensor  # (C, F) on the hidden features, float32
    label_weight: torch.Tensor  # (C, C) on the label words' log-probabilities
    bias: torch.Tensor  # (C,)
    chosen_label_weight: float  # the scale the regression saw them at (choose_label_weight)

    def scores(self, features: Features) -> torch.Tensor:
        device = features.hidden.device
        logprobs = torch.log_softmax(features.label_logits.float(), dim=-1)
        return (features.hidden.float() @ self.weight.T.to(device) + logprobs @ self.label_weight.T.to(device)
                + self.bias.to(device))

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.label_weight.nbytes + self.bias.nbytes


def linear_design(features: Features, scaler: StandardScaler, label_weight: float) -> np.ndarray:
    """The matrix the regression sees: standardised hidden features, then the scaled label log-probs."""
    logprobs = torch.log_softmax(features.label_logits.float(), dim=-1).cpu().numpy()
    return np.hstack([scaler.transform(features.hidden.float().cpu().numpy()), label_weight * logprobs])


def choose_label_weight(features: Features, labels: np.ndarray, scaler: StandardScaler, c: float) -> float:
    """The LABEL_WEIGHTS entry with the best cross-validated log loss on the pool (the middle one when a
    class has a single row, too few to split)."""
    folds = min(CV_FOLDS, int(np.bincount(labels).min()))
    if folds < 2:
        return LABEL_WEIGHTS[len(LABEL_WEIGHTS) // 2]
    split = StratifiedKFold(folds, shuffle=True, random_state=0)
    scores = [cross_val_score(LogisticRegression(C=c, max_iter=5000), linear_design(features, scaler, w), labels,
                              cv=split, scoring="neg_log_loss").mean() for w in LABEL_WEIGHTS]
    return LABEL_WEIGHTS[int(np.argmax(scores))]


def fit_linear_head(
    features: Features, labels: np.ndarray, n_classes: int, layers: FeatureLayers, c: float = LINEAR_C,
    label_weight: float | None = None,
) -> LinearHead:
    """`label_weight` None: chosen by cross-validation (choose_label_weight)."""
    y = np.asarray(labels)
    _check(len(features.hidden), y, n_classes)
    scaler = StandardScaler().fit(features.hidden.float().cpu().numpy())
    if label_weight is None:
        label_weight = choose_label_weight(features, y, scaler, c)
    model = LogisticRegression(C=c, max_iter=5000).fit(linear_design(features, scaler, label_weight), y)
    coef, intercept = model.coef_, model.intercept_
    if coef.shape[0] == 1:  # binary: one logit z for class 1, i.e. scores (0, z)
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    n_hidden = features.hidden.shape[1]
    on_hidden, on_labels = coef[:, :n_hidden], coef[:, n_hidden:] * label_weight
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    bias = intercept - (scaler.mean_ / scale) @ on_hidden.T  # (z - μ)/σ · w = z · w/σ - μ·w/σ
    full = np.zeros((n_classes, n_hidden)), np.zeros((n_classes, n_classes)), np.full(n_classes, -1e4)
    full[0][model.classes_], full[1][model.classes_], full[2][model.classes_] = on_hidden / scale, on_labels, bias
    weight, label_w, full_bias = (torch.tensor(a, dtype=torch.float32) for a in full)
    return LinearHead(layers, weight, label_w, full_bias, label_weight)


@dataclass(frozen=True)
class KnnHead:
    layers: FeatureLayers
    keys: torch.Tensor  # (N, F) unit-norm pool features
    labels: torch.Tensor  # (N,) class of each
    n_classes: int
    k: int = KNN_K

    def scores(self, features: Features) -> torch.Tensor:
        hidden = features.hidden
        sims = torch.nn.functional.normalize(hidden.float(), dim=-1) @ self.keys.T.to(hidden.device)
        top = sims.topk(min(self.k, self.keys.shape[0]), dim=-1)
        votes = torch.zeros(hidden.shape[0], self.n_classes, device=hidden.device)
        votes.scatter_add_(1, self.labels.to(hidden.device)[top.indices], top.values.clamp(min=0) + 1e-3)
        return torch.log(votes + 1e-6)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.labels.nbytes


def fit_knn_head(
    features: Features, labels: np.ndarray, n_classes: int, layers: FeatureLayers, k: int = KNN_K
) -> KnnHead:
    y = np.asarray(labels)
    _check(len(features.hidden), y, n_classes)
    keys = torch.nn.functional.normalize(features.hidden.float().cpu(), dim=-1)
    return KnnHead(layers, keys, torch.tensor(y, dtype=torch.long), n_classes, k)
