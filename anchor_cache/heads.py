"""Heads on anchor-context features: more labelled rows counted at Hidden_anchor's cost.

A text's features come from its own forward against the task's Hidden_anchor cache (the query's
forward, as served): hidden states of chosen layers at its last token and averaged over its tokens
(`FeatureLayers`), and the label-word logits that forward gives anyway. A head fitted on a labelled
pool turns them into class scores:

- `LinearHead`: logistic regression (scikit-learn, strong L2) on the standardised hidden features
  stacked with the label words' log-probabilities, with the standardisation folded into the
  weights, so serving it is one (C, F) and one (C, C) matmul. Deep-but-not-last layers carry more
  of what a class looks like than the final one, which is tuned to predict the next token; the
  label words carry what the context's demonstrations taught. Two things are chosen per task on
  the pool by stratified cross-validation (log loss): which layers to read (`LAYER_CHOICES`: two
  deep last-token states and a mid-depth mean, or five last-token states and four means from 0.4
  of the depth up; topic-like tasks such as TREC gain from the wider read, sentiment loses) and
  how much the label words count (their scale against the unit-variance hidden features, hence
  against the L2 prior: on SST-2 they are the better half of the evidence, on TREC they mislead).
  The regression runs on the pool's principal components, which gives the same model as on the
  raw features (with an L2 prior the weights lie in the span of the rows) in as many dimensions as
  the pool has rows instead of thousands.
- `KnnHead`: cosine k-nearest neighbours among the pool's final hidden states (kNN Prompting's
  idea on hidden states rather than label-word distributions); scores are the log of smoothed
  similarity-weighted neighbour votes.

Both give (N, C) scores whose argmax is the prediction and whose softmax reads as probabilities.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.preprocessing import StandardScaler

from anchor_cache.errors import ValidationError
from anchor_cache.task import Method

LINEAR_C = 0.01  # inverse L2 strength: a few rows per class in thousands of dimensions need a strong prior
LABEL_WEIGHTS = (0.0, 3.0, 10.0)  # scales of the label log-probs against unit-variance hidden features
CV_FOLDS = 4
# (at the last token, averaged over the row's tokens), as fractions of the model's depth
LAYER_CHOICES = (((0.8, 1.0), (0.53,)), ((0.53, 0.67, 0.8, 0.9, 1.0), (0.4, 0.53, 0.67, 0.8)))
KNN_K = 8


@dataclass(frozen=True)
class FeatureLayers:
    """Hidden-state indices a head reads: 0 is the embeddings, L (the model's depth) the final-norm
    output; `last` at the row's last token, `mean` averaged over the row's tokens."""

    last: tuple[int, ...] = ()
    mean: tuple[int, ...] = ()

    def union(self, other: FeatureLayers) -> FeatureLayers:
        return FeatureLayers(tuple(sorted({*self.last, *other.last})), tuple(sorted({*self.mean, *other.mean})))

    def columns(self, subset: FeatureLayers, width: int) -> np.ndarray:
        """Indices of `subset`'s columns among features laid out as `read_features` lays out these layers,
        `width` columns per layer."""
        blocks = [self.last.index(i) for i in subset.last] + [len(self.last) + self.mean.index(i) for i in subset.mean]
        return np.concatenate([np.arange(b * width, (b + 1) * width) for b in blocks])


def linear_choices(num_layers: int) -> tuple[FeatureLayers, ...]:
    """The layer sets the linear head chooses among for a model `num_layers` deep (LAYER_CHOICES)."""
    def at(fractions: tuple[float, ...]) -> tuple[int, ...]:
        return tuple(sorted({round(f * num_layers) for f in fractions}))
    return tuple(FeatureLayers(at(last), at(mean)) for last, mean in LAYER_CHOICES)


def linear_layers(num_layers: int) -> FeatureLayers:
    """Every layer any of the linear head's choices reads: what its pool is featurised with."""
    return functools.reduce(FeatureLayers.union, linear_choices(num_layers))


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


def select_layers(features: Features, layers: FeatureLayers, subset: FeatureLayers) -> Features:
    """The columns of `subset`'s layers among `features`, which read `layers` (as `read_features` lays them out)."""
    blocks = len(layers.last) + len(layers.mean)
    width = features.hidden.shape[1] // blocks
    if width * blocks != features.hidden.shape[1] or not (set(subset.last) <= set(layers.last)
                                                          and set(subset.mean) <= set(layers.mean)):
        raise ValidationError(f"features of {features.hidden.shape[1]} columns do not read {layers}, or {subset} is "
                              "not among them")
    at = torch.as_tensor(layers.columns(subset, width), device=features.hidden.device)
    return Features(features.hidden[:, at], features.label_logits)


def _check(n_features: int, labels: np.ndarray, n_classes: int) -> None:
    if n_features != len(labels) or len(labels) == 0:
        raise ValidationError(f"a head needs labelled rows: got {n_features} features and {len(labels)} labels")
    missing = sorted(set(range(n_classes)) - set(labels.tolist()))
    if missing:
        raise ValidationError(f"the labelled pool has no row of classes {missing}; every class needs at least one")


@dataclass(frozen=True)
class LinearHead:
    layers: FeatureLayers  # the layers it reads (its chosen LAYER_CHOICES entry)
    weight: torch.Tensor  # (C, F) on the hidden features, float32
    label_weight: torch.Tensor  # (C, C) on the label words' log-probabilities
    bias: torch.Tensor  # (C,)
    chosen_label_weight: float  # the scale the regression saw them at

    def scores(self, features: Features) -> torch.Tensor:
        device = features.hidden.device
        logprobs = torch.log_softmax(features.label_logits.float(), dim=-1)
        return (features.hidden.float() @ self.weight.T.to(device) + logprobs @ self.label_weight.T.to(device)
                + self.bias.to(device))

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.label_weight.nbytes + self.bias.nbytes


@dataclass(frozen=True)
class LinearDesign:
    """The pool's hidden features standardised and turned to their principal components: the
    coordinates the regression is fitted in, and the map back to raw features for serving."""

    scaler: StandardScaler
    pca: PCA

    @classmethod
    def fit(cls, hidden: np.ndarray) -> LinearDesign:
        scaler = StandardScaler().fit(hidden)
        return cls(scaler, PCA(svd_solver="full").fit(scaler.transform(hidden)))

    def coordinates(self, hidden: np.ndarray) -> np.ndarray:
        """(N, K) principal coordinates of raw hidden features (N, F)."""
        return self.pca.transform(self.scaler.transform(hidden))

    def fold(self, coef: np.ndarray, intercept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(C, F) weights and (C,) bias on raw features equal to `coef` (C, K) on the coordinates."""
        on_standard = coef @ self.pca.components_  # (C, F)
        scale = self.scaler.scale_  # constant features have scale 1 (StandardScaler)
        bias = intercept - on_standard @ (self.scaler.mean_ / scale) - on_standard @ self.pca.mean_
        return on_standard / scale, bias


def _cv_log_loss(x: np.ndarray, labels: np.ndarray, c: float, folds: int) -> float:
    split = StratifiedKFold(folds, shuffle=True, random_state=0)
    return float(cross_val_score(LogisticRegression(C=c, max_iter=5000), x, labels, cv=split,
                                 scoring="neg_log_loss").mean())


def fit_linear_head(
    features: Features, labels: np.ndarray, n_classes: int, layers: FeatureLayers,
    choices: Sequence[FeatureLayers] | None = None, c: float = LINEAR_C, label_weight: float | None = None,
) -> LinearHead:
    """`features` read `layers`; the head reads one of `choices` (subsets of `layers`; None: `layers`
    itself) with one of LABEL_WEIGHTS (or `label_weight` when given), whichever pair has the best
    cross-validated log loss on the pool. With a class of a single row, too few to split, the first
    choice and the middle weight."""
    y = np.asarray(labels)
    _check(len(features.hidden), y, n_classes)
    choices = list(choices) if choices is not None else [layers]
    weights = list(LABEL_WEIGHTS) if label_weight is None else [label_weight]
    if not all(choice.last or choice.mean for choice in choices):
        raise ValidationError(f"a choice of layers among {layers} is empty")
    logprobs = torch.log_softmax(features.label_logits.float(), dim=-1).cpu().numpy()
    parts = [select_layers(features, layers, choice).hidden.float().cpu().numpy() for choice in choices]
    designs = [LinearDesign.fit(part) for part in parts]
    coordinates = [design.coordinates(part) for design, part in zip(designs, parts, strict=True)]

    def matrix(i: int, w: float) -> np.ndarray:
        """What the regression sees: choice i's principal coordinates, then the scaled label log-probs."""
        return np.hstack([coordinates[i], w * logprobs])

    folds = min(CV_FOLDS, int(np.bincount(y).min()))
    if folds < 2 or len(choices) * len(weights) == 1:
        best = (0, weights[len(weights) // 2])
    else:
        scores = {(i, w): _cv_log_loss(matrix(i, w), y, c, folds) for i in range(len(choices)) for w in weights}
        best = max(scores, key=scores.get)
    i, w = best
    model = LogisticRegression(C=c, max_iter=5000).fit(matrix(i, w), y)
    coef, intercept = model.coef_, model.intercept_
    if coef.shape[0] == 1:  # binary: one logit z for class 1, i.e. scores (0, z)
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    n_coords = designs[i].pca.n_components_
    on_hidden, bias = designs[i].fold(coef[:, :n_coords], intercept)
    on_labels = coef[:, n_coords:] * w
    full = np.zeros((n_classes, on_hidden.shape[1])), np.zeros((n_classes, n_classes)), np.full(n_classes, -1e4)
    full[0][model.classes_], full[1][model.classes_], full[2][model.classes_] = on_hidden, on_labels, bias
    weight, label_w, full_bias = (torch.tensor(a, dtype=torch.float32) for a in full)
    return LinearHead(choices[i], weight, label_w, full_bias, w)


def head_layers(method: Method, num_layers: int) -> FeatureLayers:
    """The layers `method`'s head is fitted on, for a model `num_layers` deep."""
    return linear_layers(num_layers) if method == Method.LINEAR_HEAD else final_layer(num_layers)


def fit_head(method: Method, features: Features, labels: np.ndarray, n_classes: int,
             num_layers: int) -> LinearHead | KnnHead:
    """`method`'s head (LINEAR_HEAD or KNN) on a pool's features read at `head_layers(method, num_layers)`."""
    layers = head_layers(method, num_layers)
    if method == Method.LINEAR_HEAD:
        return fit_linear_head(features, labels, n_classes, layers, choices=linear_choices(num_layers))
    return fit_knn_head(features, labels, n_classes, layers)


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
