"""The accuracy a `method: auto` task estimates on its traffic from its served probabilities."""

from __future__ import annotations

import numpy as np
import torch

from anchor_cache.traffic import TrafficAccuracy, of_rows


def _served(top: np.ndarray) -> torch.Tensor:
    """Two-class served log-probabilities whose top probabilities are `top`."""
    return torch.log(torch.as_tensor(np.stack([top, 1 - top], 1)))


def test_the_interval_holds_the_accuracy_of_calibrated_rows_95_percent_of_the_time():
    """Each row is right with its top probability: over many windows, the interval (no pool margin)
    holds the share of rows that were right about 95% of the time."""
    rng = np.random.default_rng(0)
    held, draws = 0, 2000
    for _ in range(draws):
        top = rng.uniform(0.5, 1.0, 300)
        traffic = TrafficAccuracy(0.0, 0.0, window=300, min_samples=300)
        traffic.observe(_served(top))
        _, low, high = traffic.reading()[1]
        held += low <= float((rng.random(300) < top).mean()) <= high
    assert 0.93 <= held / draws <= 0.97


def test_it_follows_a_class_mix_the_pool_never_had():
    """A balanced pool's rows: class 0 answered at 0.95, class 1 at 0.6, so 77.5% on the pool. The
    traffic is 90% class 1: it gets about 63.5%, which the estimate follows and the pool's misses."""
    rng = np.random.default_rng(1)
    n = 2000
    top = np.where(rng.random(n) < 0.9, 0.6, 0.95)
    traffic = TrafficAccuracy(0.05, 0.05, window=n, min_samples=n)
    traffic.observe(_served(top))
    accuracy, low, high = traffic.reading()[1]
    measured = float((rng.random(n) < top).mean())
    assert abs(accuracy - 0.635) < 0.02 and low <= measured <= high
    assert high < 0.775 - 0.05


def test_it_waits_for_min_samples_and_keeps_only_the_window():
    traffic = TrafficAccuracy(0.1, 0.2, window=4, min_samples=3)
    traffic.observe(_served(np.array([0.9, 0.9])))
    assert traffic.reading() == (2, None) and traffic.info()["accuracy"] is None
    traffic.observe(_served(np.array([0.9, 1.0, 1.0, 1.0, 1.0])))  # every row at 0.9 leaves the window
    accuracy, low, high = traffic.reading()[1]
    assert accuracy == 1.0
    assert (low, high) == (0.9, 1.0)  # certain rows: the pool's margins alone, clipped at 1
    assert traffic.info() == {"accuracy": 1.0, "low": 0.9, "high": 1.0, "samples": 4, "min_samples": 3,
                              "window": 4}


def test_its_running_sums_read_as_the_window_itself_after_it_wraps_many_times():
    rng = np.random.default_rng(2)
    traffic = TrafficAccuracy(0.03, 0.04, window=50, min_samples=10)
    served: list[float] = []
    for size in rng.integers(1, 70, 200):
        top = rng.uniform(0.5, 1.0, size)
        traffic.observe(_served(top))
        served.extend(top)
    rows, found = traffic.reading()
    assert rows == 50
    assert np.allclose(found, of_rows(np.array(served[-50:]), 0.03, 0.04), atol=1e-6)
    assert traffic.emptied().reading() == (0, None)
