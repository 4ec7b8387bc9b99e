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
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from anchor_cache.task import Prior

EM_ITERATIONS = 200
EM_TOLERANCE = 1e-6
FLOOR = 1e-6  # no class's prior estimate reaches 0: log π stays finite and the class can come back


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
        estimate = em_prior(self._rows[: self.samples], self.base)
        with self._lock:  # the two fields `info` reads change together
            self._estimate = estimate
            self._correction = torch.as_tensor(np.log(estimate) - np.log(self.base), dtype=torch.float32)

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
                        "active": self._estimate is not None,
                        "estimate": None if self._estimate is None else [round(float(x), 4) for x in self._estimate]}
            return out
