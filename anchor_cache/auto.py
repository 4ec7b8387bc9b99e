"""`method: auto`: the method a task serves, chosen on its labelled pool by cross-validation.

No method wins everywhere: the pool's β helps on some tasks and not others, a head beats the label
words on topic-like tasks and loses on sentiment. So each candidate is fitted on k−1 stratified
folds of the pool (β learned, a head fitted, a many-shot cache built from those rows only) and
scores the held-out fold. Its out-of-fold log-probabilities give a log loss (a proper score: it
rewards probabilities that can be trusted, not only the argmax) and an accuracy.

Each fold's method learns from fewer rows than the served one, which learns from the whole pool,
and the methods that learn from the pool gain from more rows, a head most: cross-validation at 4
folds (each fold learning from 3/4 of the pool) undervalues them, in the choice and in the
estimate (docs/RESULTS.md). Two things close that gap. The pool is cross-validated at `FOLDS`
folds, so each fold learns from 7/8 of it; and at `CURVE_FOLDS` as well (half of it), and each
candidate's per-row log loss and correctness at the two sizes are extrapolated, linearly in 1/rows
learned from, to the whole pool. From these two sizes the extrapolation adds a sixth of the
difference between them, so it adds little noise. β training dominates the cost, and it runs once
per fold: ten times instead of four, 1.7 to 2.6 times the time on the development sets. The
candidates that learn nothing from the pool (zero-shot, Hidden_anchor) are scored once. The lowest
extrapolated log loss wins; a candidate within `TIE` nats of it wins instead when it is cheaper to
serve (`COST`).

The linear head without β is not a candidate. It beats the head under β on TREC's test rows, but the
pool's cross-validation cannot tell which is better: with it, `auto` lost 1.6 points over 8 (dataset,
seed) pairs, 12 on one SST-2 seed where the two heads' log losses were 0.002 apart (docs/RESULTS.md).

The winner's predictions also estimate the task's accuracy: its extrapolated accuracy, with the
Wilson 95% interval of its out-of-fold accuracy moved by the extrapolation and widened by that
correction's own standard error; their expected calibration error (ECE); and a temperature
fitted on the out-of-fold predictions, kept where it lowers their log loss. What the interval
leaves out: the estimate belongs to the best of several candidates on the same rows (optimistic),
and it is an interval for the accuracy on rows like the pool's, so traffic unlike the pool can fall
outside it; an accuracy measured on a given number of rows has its own interval (`Estimate.for_rows`),
wider by those rows' binomial spread. On the development sets' test files, which differ from the
pools (a class mix, a source of questions), it held the test accuracy in only 30 of 40 (dataset,
seed) pairs (docs/RESULTS.md). The temperature also makes the served probabilities an estimate of
the accuracy on the traffic itself, which a server makes without labels (traffic.py): 36 of 40.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from scipy.stats import binomtest, norm
from sklearn.model_selection import StratifiedKFold

from anchor_cache.classifier import Classifier
from anchor_cache.errors import ValidationError
from anchor_cache.heads import Features, fit_head, head_layers
from anchor_cache.many_shot import many_shot_cache
from anchor_cache.reweighting import TrainConfig, train_reweighting
from anchor_cache.task import Demonstration, Method

FOLDS = 8  # each fold's method learns from 7/8 of the pool
CURVE_FOLDS = 2  # the learning curve's other point: half the pool
TIE = 0.01  # nats of mean log loss within which the cheaper candidate wins
ECE_BINS = 10
Z95 = float(norm.ppf(0.975))  # a 95% interval's half-width in standard errors


@dataclass(frozen=True)
class Candidate:
    name: str
    method: Method
    reweight: bool  # served under β learned from the pool


# Cheapest first: the order ties are broken in (batch-1 latency, docs/RESULTS.md: kNN's vote costs
# about 1%, β's correction about 12% on the CPU).
CANDIDATES = (
    Candidate("zero_shot", Method.ZERO_SHOT, False),
    Candidate("hidden_anchor", Method.HIDDEN_ANCHOR, False),
    Candidate("knn", Method.KNN, False),
    Candidate("hidden_anchor_reweighted", Method.HIDDEN_ANCHOR, True),
    Candidate("linear_head_reweighted", Method.LINEAR_HEAD, True),
    Candidate("many_shot", Method.MANY_SHOT, False),
)
COST = {c.name: rank for rank, c in enumerate(CANDIDATES)}


@dataclass(frozen=True)
class Estimate:
    """The chosen method's accuracy, extrapolated from its out-of-fold predictions to the method
    learning from the whole pool; its interval and its calibration."""

    accuracy: float
    low: float  # 95%: Wilson on the out-of-fold accuracy, moved by the extrapolation, widened by its uncertainty
    high: float
    rows: int
    ece: float  # after the temperature, when one is kept
    temperature: float  # 1.0: none kept
    correction: float  # what the extrapolation added to the out-of-fold accuracy

    def for_rows(self, rows: int) -> tuple[float, float]:
        """A 95% interval for the accuracy that `rows` new rows like the pool's will measure: the
        estimate's interval widened, in quadrature, by those rows' own binomial spread. The estimate's
        interval is for the accuracy on unlimited such rows; a check on a few hundred labelled rows
        carries several points of noise of its own, which this one includes."""
        if rows < 1:
            raise ValueError(f"an accuracy is measured on at least one row, not {rows}")
        spread = float(Z95 * np.sqrt(self.accuracy * (1 - self.accuracy) / rows))
        return (max(0.0, self.accuracy - float(np.hypot(self.accuracy - self.low, spread))),
                min(1.0, self.accuracy + float(np.hypot(self.high - self.accuracy, spread))))

    def covers(self, accuracy: float, rows: int | None = None) -> bool:
        """Whether `accuracy` lies in the estimate's interval, or in the interval for `rows` rows."""
        low, high = (self.low, self.high) if rows is None else self.for_rows(rows)
        return low <= accuracy <= high


@dataclass(frozen=True)
class OutOfFold:
    """A candidate's (N, C) out-of-fold log-probabilities of the pool's rows at the most folds and at
    the fewest, the rows' classes, and the weight that extrapolates from them (`curve_weight`)."""

    most: np.ndarray
    fewest: np.ndarray
    gold: np.ndarray
    weight: float


@dataclass(frozen=True)
class Choice:
    chosen: Candidate
    # candidate name -> log_loss and accuracy (extrapolated), cv_log_loss and cv_accuracy (at the most
    # folds, as measured), cost rank
    scores: dict[str, dict[str, float]]
    estimate: Estimate
    folds: tuple[int, ...]  # the cross-validations run, fewest folds first
    seconds: float  # how long choosing took
    predictions: OutOfFold  # the chosen candidate's: what its estimate was made from

    def info(self) -> dict:
        return {"chosen": self.chosen.name, "method": str(self.chosen.method), "reweight": self.chosen.reweight,
                "folds": list(self.folds), "seconds": round(self.seconds, 1), "candidates": self.scores,
                "estimate": asdict(self.estimate)}


def log_loss(logprobs: np.ndarray, gold: np.ndarray) -> float:
    return float(_row_losses(logprobs, gold).mean())


def _row_losses(logprobs: np.ndarray, gold: np.ndarray) -> np.ndarray:
    return -logprobs[np.arange(len(gold)), gold]


def _row_correct(logprobs: np.ndarray, gold: np.ndarray) -> np.ndarray:
    return (logprobs.argmax(1) == gold).astype(float)


def expected_calibration_error(logprobs: np.ndarray, gold: np.ndarray, bins: int = ECE_BINS) -> float:
    """|accuracy − confidence| averaged over equal-width confidence bins, weighted by their rows."""
    confidence = np.exp(logprobs.max(1))
    correct = logprobs.argmax(1) == gold
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    return float(sum(abs(correct[which == b].mean() - confidence[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))


def rescaled(logprobs: np.ndarray, temperature: float) -> np.ndarray:
    scaled = logprobs / temperature
    return scaled - np.logaddexp.reduce(scaled, axis=1, keepdims=True)


def fit_temperature(logprobs: np.ndarray, gold: np.ndarray) -> float:
    """The temperature that minimises the log loss of `logprobs` (1.0 when it does not lower it)."""
    found = minimize_scalar(lambda t: log_loss(rescaled(logprobs, t), gold), bounds=(0.05, 20.0), method="bounded")
    return float(found.x) if found.fun < log_loss(logprobs, gold) - 1e-4 else 1.0


def curve_weight(folds: Sequence[int]) -> float:
    """w such that a per-row score s extrapolates to the whole pool as s_most + w (s_most − s_fewest),
    s_most from the most folds and s_fewest from the fewest: linear in 1/rows learned from, k folds
    learning from (k − 1)/k of the pool. 0 for a single design."""
    if len(folds) < 2:
        return 0.0
    fewest, most = (k / (k - 1) for k in (min(folds), max(folds)))  # pool rows per row learned from
    return (most - 1) / (fewest - most)


def _extrapolate(most: np.ndarray, fewer: np.ndarray, weight: float) -> np.ndarray:
    """Per-row scores at the most training rows carried on to the whole pool, linearly in 1/rows."""
    return most + weight * (most - fewer)


def extrapolated_accuracy(logprobs: np.ndarray, gold: np.ndarray, fewer: np.ndarray | None = None,
                          weight: float = 0.0) -> tuple[float, float, float]:
    """(accuracy extrapolated to the whole pool, the correction the extrapolation made, that
    correction's 95% half-width) from a method's out-of-fold log-probabilities; `fewer`: its
    out-of-fold log-probabilities when it learned from fewer rows, extrapolated from with `weight`
    (`curve_weight`)."""
    correct = _row_correct(logprobs, gold)
    if fewer is None or not weight:
        return float(correct.mean()), 0.0, 0.0
    gain = correct - _row_correct(fewer, gold)  # per row: what learning from more rows changed
    correction = weight * float(gain.mean())
    spread = float(Z95 * weight * gain.std(ddof=1) / np.sqrt(len(gold)))
    return float(np.clip(correct.mean() + correction, 0.0, 1.0)), correction, spread


def estimate(logprobs: np.ndarray, gold: np.ndarray, fewer: np.ndarray | None = None,
             weight: float = 0.0) -> Estimate:
    """The accuracy estimate (`extrapolated_accuracy`'s arguments): the Wilson interval of the
    out-of-fold accuracy, moved by the correction and widened by its half-width in quadrature."""
    temperature = fit_temperature(logprobs, gold)
    correct = int(_row_correct(logprobs, gold).sum())
    measured = correct / len(gold)
    interval = binomtest(correct, len(gold)).proportion_ci(confidence_level=0.95, method="wilson")
    accuracy, correction, spread = extrapolated_accuracy(logprobs, gold, fewer, weight)
    return Estimate(accuracy=accuracy, low=max(0.0, accuracy - float(np.hypot(measured - interval.low, spread))),
                    high=min(1.0, accuracy + float(np.hypot(interval.high - measured, spread))), rows=len(gold),
                    ece=expected_calibration_error(rescaled(logprobs, temperature), gold), temperature=temperature,
                    correction=correction)


FitFold = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Curve:
    """Each candidate's out-of-fold log-probabilities at two training sizes of the pool."""

    folds: tuple[int, ...]  # fewest first; one entry when the pool allows only one design
    most: dict[str, np.ndarray]  # (N, C) from the most folds: each fold's method learned from the most rows
    fewest: dict[str, np.ndarray]  # from the fewest folds (the same arrays for a single design)

    def score(self, name: str, gold: np.ndarray) -> dict[str, float]:
        """`name`'s log loss and accuracy extrapolated to the whole pool, and measured at the most folds."""
        weight, most, fewest = curve_weight(self.folds), self.most[name], self.fewest[name]
        losses, fewer_losses = _row_losses(most, gold), _row_losses(fewest, gold)
        return {"log_loss": round(float(_extrapolate(losses, fewer_losses, weight).mean()), 4),
                "accuracy": round(extrapolated_accuracy(most, gold, fewest, weight)[0], 4),
                "cv_log_loss": round(float(losses.mean()), 4),
                "cv_accuracy": round(float(_row_correct(most, gold).mean()), 4)}


def fold_designs(gold: np.ndarray, n_classes: int) -> tuple[int, ...]:
    """The fold counts to cross-validate at (CURVE_FOLDS and FOLDS, each at most the smallest class's rows)."""
    rows = int(np.bincount(gold, minlength=n_classes).min())
    if rows < 2:
        raise ValidationError("method auto needs at least 2 labelled pool rows of every class to cross-validate")
    return tuple(sorted({min(CURVE_FOLDS, rows), min(FOLDS, rows)}))


def out_of_fold(fit_fold: FitFold, gold: np.ndarray, n_classes: int, folds: int, seed: int = 0,
                after_fold: Callable[[], None] | None = None) -> dict[str, np.ndarray]:
    """Stratified `folds`-fold cross-validation: `fit_fold(train, held)` gives each candidate fitted on
    the rows `train` as (len(held), C) log-probabilities of the rows `held`; every row's come from
    the fold that held it out."""
    out: dict[str, np.ndarray] = {}
    for train, held in StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(gold, gold):
        for name, logprobs in fit_fold(train, held).items():
            out.setdefault(name, np.zeros((len(gold), n_classes)))[held] = logprobs
        if after_fold is not None:
            after_fold()
    return out


def learning_curve(fit_fold: FitFold, gold: np.ndarray, n_classes: int, seed: int = 0,
                   on_fold: Callable[[int, int], None] | None = None) -> Curve:
    """`out_of_fold` at each of `fold_designs`; `on_fold(done, total)` after every fold."""
    folds = fold_designs(gold, n_classes)
    done, total = itertools.count(1), sum(folds)
    tick = (lambda: on_fold(next(done), total)) if on_fold is not None else None
    runs = {k: out_of_fold(fit_fold, gold, n_classes, k, seed, tick) for k in folds}
    return Curve(folds, runs[folds[-1]], runs[folds[0]])


def _rows(features: Features, index: np.ndarray) -> Features:
    at = torch.as_tensor(index, device=features.hidden.device)
    return Features(features.hidden[at], features.label_logits[at])


def _log_softmax(scores: torch.Tensor) -> np.ndarray:
    return torch.log_softmax(scores.float(), -1).cpu().numpy()


@dataclass(frozen=True)
class FoldInputs:
    """What every fold of one pool shares."""

    clf: Classifier
    texts: list[str]
    gold: np.ndarray
    cfg: TrainConfig  # β training's
    knn_features: Features  # the pool's β-free kNN features: the same in every fold


def _fit_fold(pool: FoldInputs, should_stop: Callable[[], bool] | None,
              train: np.ndarray, held: np.ndarray) -> dict[str, np.ndarray]:
    """The candidates that learn from the pool, fitted on the rows `train`: log-probabilities of the rows `held`."""
    clf, texts, gold = pool.clf, pool.texts, pool.gold
    rows, labels, part = [texts[i] for i in train], gold[train], [texts[i] for i in held]
    task, depth = clf.task, clf.lm.num_layers
    beta = train_reweighting(clf, rows, labels.tolist(), pool.cfg, progress=False, should_stop=should_stop).beta
    linear = clf.fit_head(Method.LINEAR_HEAD, rows, labels, beta)
    knn = fit_head(Method.KNN, _rows(pool.knn_features, train), labels, len(task.labels), depth)
    many = Classifier(clf.lm, task, demonstrations=clf.prompt.demonstrations)
    many.install_cache(Method.HIDDEN_ANCHOR, many_shot_cache(
        clf.lm, task, [Demonstration(text=t, label=task.labels[y]) for t, y in zip(rows, labels, strict=True)]))
    with torch.inference_mode():
        # one forward under β gives the head's features and β + Hidden_anchor's label logits
        under_beta = clf.features(part, Method.HIDDEN_ANCHOR, linear.layers, beta)
        return {"hidden_anchor_reweighted": _log_softmax(under_beta.label_logits),
                "knn": _log_softmax(knn.scores(_rows(pool.knn_features, held))),
                "linear_head_reweighted": _log_softmax(linear.scores(under_beta)),
                "many_shot": _log_softmax(many.label_logits(part, Method.HIDDEN_ANCHOR))}


def choose(clf: Classifier, texts: Sequence[str], classes: Sequence[int], cfg: TrainConfig | None = None,
           seed: int = 0, should_stop: Callable[[], bool] | None = None,
           on_fold: Callable[[int, int], None] | None = None) -> Choice:
    """The candidate with the lowest extrapolated log loss on the pool (the cheaper one within TIE)."""
    start = time.perf_counter()
    texts, gold = list(texts), np.asarray(classes)
    fold_designs(gold, len(clf.task.labels))  # a pool too small fails before any forward
    with torch.inference_mode():
        # one β-free Hidden_anchor forward gives kNN's features and Hidden_anchor's label logits
        knn_features = clf.features(texts, Method.HIDDEN_ANCHOR, head_layers(Method.KNN, clf.lm.num_layers))
        fixed = {"zero_shot": _log_softmax(clf.label_logits(texts, Method.ZERO_SHOT)),
                 "hidden_anchor": _log_softmax(knn_features.label_logits)}
    pool = FoldInputs(clf, texts, gold, cfg or TrainConfig(), knn_features)

    def fit_fold(train: np.ndarray, held: np.ndarray) -> dict[str, np.ndarray]:
        return _fit_fold(pool, should_stop, train, held)

    learned = learning_curve(fit_fold, gold, len(clf.task.labels), seed, on_fold)
    curve = Curve(learned.folds, learned.most | fixed, learned.fewest | fixed)
    scores = {c.name: curve.score(c.name, gold) | {"cost": COST[c.name]} for c in CANDIDATES}
    best = min(s["log_loss"] for s in scores.values())
    chosen = min((c for c in CANDIDATES if scores[c.name]["log_loss"] <= best + TIE), key=lambda c: COST[c.name])
    held = OutOfFold(curve.most[chosen.name], curve.fewest[chosen.name], gold, curve_weight(curve.folds))
    return Choice(chosen=chosen, scores=scores, estimate=estimate(held.most, gold, held.fewest, held.weight),
                  folds=curve.folds, seconds=time.perf_counter() - start, predictions=held)
