"""Class priors: the probabilities a task serves, under the class frequencies its traffic really has.

A method's probabilities carry the class frequencies it learned under: a head fitted on a balanced
pool predicts as if every class were equally common. When the traffic's frequencies differ (EmoC's
test rows are 86% "Others"), the minority classes are over-predicted. By Bayes' rule, moving
posteriors from prior π₀ to prior π multiplies each by π/π₀ and renormalises; in log space it adds
log π − log π₀ to every row.

- `pool`: as the method gives them (no correction).
- `uniform`: π = uniform, π₀ = the pool's class frequencies (a balanced pool changes nothing).
- `adapt`: π estimated from the task's recent unlabelled traffic by EM (Saerens, Latinne and
  Decaestecker, 2002): π ← mean over rows of the posteriors moved to π, until it settles. A window
  of the last `window` rows bounds the memory, and nothing changes before `min_samples` rows.

EM reads any lean of the method as a shift: it assumes the probabilities are calibrated under π₀,
and a head fitted on 16 rows per class, or a prompt that favours one label word, is not. On traffic
in or near its pool's balance such a method's estimate lay up to 0.35 (total variation) from π₀,
and correcting towards it cost up to 5.6 points (docs/RESULTS.md). So `adapt` corrects only a shift
that is both real and large:
- real: a likelihood-ratio test of π against π₀ on the window (twice the log-likelihood ratio
  against χ² with C − 1 degrees of freedom) at level `SIGNIFICANCE`. It weighs how much the rows
  say: a weak method's EM estimate wanders far on balanced traffic, and the test calls that noise;
- large: π at least `MIN_SHIFT` from π₀. A lean is systematic, so over a large window the test
  finds it significant too; only its size tells it from a real shift.
Every refit decides again. Consecutive windows differ by `refit_every` rows at most, so the decision
does not flicker on noise, and a band below `MIN_SHIFT` to keep acting in would reach the leans.
Calibrating first (π₀ := the method's mean prediction on its own pool) does not separate the two:
a fitted head's mean prediction on its own pool is the pool's frequencies, whatever it does on new
rows, and for β + Hidden_anchor the pool's lean matched the traffic's on SST-2, not on TREC.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import chi2

from anchor_cache.task import Prior

EM_ITERATIONS = 200
EM_TOLERANCE = 1e-6
FLOOR = 1e-6  # no class's prior estimate reaches 0: log π stays finite and the class can come back
SIGNIFICANCE = 0.001  # the chance that a refit acts on unshifted traffic from a calibrated method
# Total variation between π and π₀ below which `adapt` leaves the probabilities alone. Measured on
# the development sets (docs/RESULTS.md): the methods' own leans on traffic in or near the pool's
# balance reached 0.35, EmoC's shift (85% "Others" on 4 classes) is estimated at 0.45 or more; 0.4
# is between the two. On a balanced binary task it means a 90/10 mix of traffic.
MIN_SHIFT = 0.4


def class_frequencies(classes: Sequence[int], n_classes: int) -> np.ndarray:
    """The frequencies of `classes` (uniform when there are none)."""
    if not len(classes):
        return np.full(n_classes, 1.0 / n_classes)
    counts = np.bincount(np.asarray(classes), minlength=n_classes).astype(float)
    return counts / counts.sum()


def em_prior(logprobs: np.ndarray, base: np.ndarray) -> np.ndarray:
    """The class prior of the rows whose (N, C) log-posteriors were computed under prior `base`,
    by EM (Saerens et al. 2002)."""
    shifted = logprobs - np.log(base)
    prior = base.copy()
    for _ in range(EM_ITERATIONS):
        scores = shifted + np.log(prior)
        scores -= scores.max(axis=1, keepdims=True)
        posteriors = np.exp(scores)
        posteriors /= posteriors.sum(axis=1, keepdims=True)
        updated = np.maximum(posteriors.mean(axis=0), FLOOR)
        updated /= updated.sum()
        if np.abs(updated - prior).max() < EM_TOLERANCE:
            return updated
        prior = updated
    return prior


def log_likelihood_ratio(logprobs: np.ndarray, prior: np.ndarray, base: np.ndarray) -> float:
    """log p(rows | π = `prior`) − log p(rows | π = `base`) for rows whose (N, C) log-posteriors were
    computed under `base`: a row's likelihood under π is p(x) Σ_c p(c | x) π_c / base_c."""
    return float(np.logaddexp.reduce(logprobs + np.log(prior) - np.log(base), axis=1).sum())


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return float(0.5 * np.abs(p - q).sum())


class PriorShift:
    """One served task's prior correction; `adapt` keeps a window of recent rows. Only the model
    thread observes and corrects; `info` may be read from any thread."""

    def __init__(self, mode: Prior, base: np.ndarray, window: int = 2000, min_samples: int = 200,
                 refit_every: int = 50) -> None:
        self.mode = mode
        self.base = base  # π₀: the frequencies the method's probabilities carry
        self.window, self.min_samples, self.refit_every = window, min_samples, refit_every
        self._rows = np.zeros((window, len(base)))
        self._seen = 0  # rows observed in all (the window holds the last `window` of them)
        self._since_fit = 0
        self._estimate: np.ndarray | None = None
        self._p_value: float | None = None  # the likelihood-ratio test of the estimate against π₀
        self._lock = threading.Lock()
        self._correction = self._fixed()

    def _fixed(self) -> torch.Tensor | None:
        if self.mode == Prior.UNIFORM and not np.allclose(self.base, self.base[0]):
            return torch.as_tensor(-np.log(self.base), dtype=torch.float32)
        return None

    @property
    def samples(self) -> int:
        return min(self._seen, self.window)

    def observe(self, logprobs: torch.Tensor) -> None:
        """Record rows of (N, C) log-probabilities before correction; refit π every `refit_every` rows."""
        if self.mode != Prior.ADAPT or not len(logprobs):
            return
        rows = logprobs.detach().float().cpu().numpy()[-self.window:]
        at = np.arange(self._seen, self._seen + len(rows)) % self.window
        self._rows[at] = rows
        self._seen += len(rows)
        self._since_fit += len(rows)
        if self.samples < self.min_samples or (self._estimate is not None and self._since_fit < self.refit_every):
            return
        self._since_fit = 0
        window = self._rows[: self.samples]
        estimate = em_prior(window, self.base)
        p_value = float(chi2.sf(2 * log_likelihood_ratio(window, estimate, self.base), len(self.base) - 1))
        distance = total_variation(estimate, self.base)
        clear = p_value < SIGNIFICANCE and distance >= MIN_SHIFT
        correction = torch.as_tensor(np.log(estimate) - np.log(self.base), dtype=torch.float32) if clear else None
        with self._lock:  # the fields `info` reads change together
            self._estimate, self._p_value = estimate, p_value
            self._correction = correction

    def correct(self, logprobs: torch.Tensor) -> torch.Tensor:
        """(N, C) log-probabilities moved to the prior this task serves under (unnormalised: the
        caller's log-softmax renormalises)."""
        correction = self._correction
        return logprobs if correction is None else logprobs + correction.to(logprobs.device)

    def info(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {"mode": str(self.mode), "base": [round(float(x), 4) for x in self.base]}
            if self.mode == Prior.ADAPT:
                out |= {"samples": self.samples, "min_samples": self.min_samples, "window": self.window,
                        "active": self._correction is not None,
                        "estimate": None if self._estimate is None else [round(float(x), 4) for x in self._estimate],
                        "p_value": self._p_value,
                        "distance": None if self._estimate is None
                        else round(total_variation(self._estimate, self.base), 4),
                        "acts_when": {"p_value_below": SIGNIFICANCE, "distance_at_least": MIN_SHIFT}}
            return out
