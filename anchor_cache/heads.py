"""Heads on anchor-context features: more labelled rows counted at Hidden_anchor's cost.

The feature of a text is the final-norm hidden state at its last token, computed against the task's
Hidden_anchor cache (the query's own forward, as served). A head fitted on a labelled pool turns it
into class scores:

- `LinearHead`: logistic regression (scikit-learn, standardised features, strong L2), with the
  standardisation folded into the weights, so serving it is one (C, H) matmul;
- `KnnHead`: cosine k-nearest neighbours among the pool's features (kNN Prompting's idea on hidden
  states rather than label-word distributions); scores are the log of smoothed neighbour votes.

Both give (N, C) scores whose argmax is the prediction and whose softmax reads as probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from anchor_cache.errors import ValidationError

LINEAR_C = 0.01  # inverse L2 strength: a few rows per class in hundreds of dimensions need a strong prior
KNN_K = 8


def _check(features: np.ndarray, labels: np.ndarray, n_classes: int) -> None:
    if len(features) != len(labels) or len(labels) == 0:
        raise ValidationError(f"a head needs labelled rows: got {len(features)} features and {len(labels)} labels")
    missing = sorted(set(range(n_classes)) - set(labels.tolist()))
    if missing:
        raise ValidationError(f"the labelled pool has no row of classes {missing}; every class needs at least one")


@dataclass(frozen=True)
class LinearHead:
    weight: torch.Tensor  # (C, H) float32
    bias: torch.Tensor  # (C,)

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.float() @ self.weight.T.to(hidden.device) + self.bias.to(hidden.device)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.bias.nbytes


def fit_linear_head(features: torch.Tensor, labels: np.ndarray, n_classes: int, c: float = LINEAR_C) -> LinearHead:
    x, y = features.float().cpu().numpy(), np.asarray(labels)
    _check(x, y, n_classes)
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(C=c, max_iter=5000).fit(scaler.transform(x), y)
    coef, intercept = model.coef_, model.intercept_
    if coef.shape[0] == 1:  # binary: one logit z for class 1, i.e. scores (0, z)
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    weight = coef / scale  # (z - μ)/σ · w = z · w/σ - μ·w/σ
    bias = intercept - (scaler.mean_ / scale) @ coef.T
    full_w, full_b = np.zeros((n_classes, x.shape[1])), np.full(n_classes, -1e4)
    full_w[model.classes_], full_b[model.classes_] = weight, bias
    return LinearHead(torch.tensor(full_w, dtype=torch.float32), torch.tensor(full_b, dtype=torch.float32))


@dataclass(frozen=True)
class KnnHead:
    keys: torch.Tensor  # (N, H) unit-norm pool features
    labels: torch.Tensor  # (N,) class of each
    n_classes: int
    k: int = KNN_K

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        sims = torch.nn.functional.normalize(hidden.float(), dim=-1) @ self.keys.T.to(hidden.device)
        top = sims.topk(min(self.k, self.keys.shape[0]), dim=-1)
        votes = torch.zeros(hidden.shape[0], self.n_classes, device=hidden.device)
        votes.scatter_add_(1, self.labels.to(hidden.device)[top.indices], top.values.clamp(min=0) + 1e-3)
        return torch.log(votes + 1e-6)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.labels.nbytes


def fit_knn_head(features: torch.Tensor, labels: np.ndarray, n_classes: int, k: int = KNN_K) -> KnnHead:
    y = np.asarray(labels)
    _check(features.float().cpu().numpy(), y, n_classes)
    keys = torch.nn.functional.normalize(features.float().cpu(), dim=-1)
    return KnnHead(keys, torch.tensor(y, dtype=torch.long), n_classes, k)
