"""Class priors: EM recovers a known shift, the correction is Bayes' rule, memory and start are bounded,
and `adapt` acts only on a shift that is significant and large (not on a method's lean, nor on noise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anchor_cache.evaluate import prior_predictions
from anchor_cache.priors import (
    MIN_SHIFT,
    SIGNIFICANCE,
    Prior,
    PriorShift,
    class_frequencies,
    em_prior,
    log_likelihood_ratio,
    total_variation,
)
from tests.conftest import ADMIN, sentiment_task, wait_finished

MEANS = np.array([-2.0, 0.0, 2.0])  # three classes, one Gaussian feature each, unit variance


def traffic(prior: list[float], n: int, seed: int = 0, spread: float = 1.0,
            lean: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) log-posteriors under a uniform prior for rows drawn with `prior`, and their classes:
    exact, with the class means `spread` times MEANS apart (small: a weak method), unless `lean`
    adds a constant to every row's logits (a miscalibrated method favouring some classes)."""
    rng = np.random.default_rng(seed)
    means = spread * MEANS
    classes = rng.choice(len(means), size=n, p=prior)
    x = rng.normal(means[classes], 1.0)
    logits = -0.5 * (x[:, None] - means[None, :]) ** 2 + np.asarray(lean if lean is not None else 0.0)
    return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True), classes


def accuracy(logprobs: np.ndarray, classes: np.ndarray) -> float:
    return float((logprobs.argmax(1) == classes).mean())


@pytest.mark.parametrize("truth", [[0.86, 0.07, 0.07], [0.1, 0.3, 0.6], [1 / 3, 1 / 3, 1 / 3]])
def test_em_recovers_a_known_prior(truth):
    logprobs, _ = traffic(truth, 20_000)
    np.testing.assert_allclose(em_prior(logprobs, np.full(3, 1 / 3)), truth, atol=0.02)


def test_the_correction_is_bayes_rule_and_helps_only_under_shift():
    uniform = np.full(3, 1 / 3)
    shifted, classes = traffic([0.86, 0.07, 0.07], 5000, seed=1)
    estimate = em_prior(shifted, uniform)
    corrected = shifted + np.log(estimate) - np.log(uniform)
    oracle = shifted + np.log([0.86, 0.07, 0.07]) - np.log(uniform)  # Bayes-optimal under the true prior
    assert accuracy(corrected, classes) >= accuracy(shifted, classes) + 0.05
    assert accuracy(corrected, classes) == pytest.approx(accuracy(oracle, classes), abs=0.01)
    balanced, classes = traffic([1 / 3] * 3, 5000, seed=2)
    corrected = balanced + np.log(em_prior(balanced, uniform)) - np.log(uniform)
    assert accuracy(corrected, classes) == pytest.approx(accuracy(balanced, classes), abs=0.01)


def test_adapt_waits_for_its_minimum_then_corrects_within_a_bounded_window():
    shift = PriorShift(Prior.ADAPT, np.full(3, 1 / 3), window=500, min_samples=200, refit_every=50)
    logprobs, _ = traffic([0.86, 0.07, 0.07], 3000, seed=3)
    rows = torch.as_tensor(logprobs, dtype=torch.float32)
    shift.observe(rows[:150])
    assert torch.equal(shift.correct(rows[:5]), rows[:5]) and shift.info()["active"] is False
    shift.observe(rows[150:250])
    info = shift.info()
    assert info["active"] is True and info["samples"] == 250
    moved = shift.correct(rows[:5]) - rows[:5]
    assert bool((moved[:, 0] > moved[:, 1]).all() and (moved[:, 0] > moved[:, 2]).all())  # towards the common class
    for start in range(250, 3000, 100):
        shift.observe(rows[start : start + 100])
    info = shift.info()
    assert info["samples"] == 500 and shift._rows.shape == (500, 3)  # the window, not the whole stream
    np.testing.assert_allclose(info["estimate"], [0.86, 0.07, 0.07], atol=0.06)


def test_em_maximises_the_likelihood_the_shift_is_tested_with():
    uniform = np.full(3, 1 / 3)
    logprobs, _ = traffic([0.6, 0.3, 0.1], 2000, seed=5)
    estimate = em_prior(logprobs, uniform)
    best = log_likelihood_ratio(logprobs, estimate, uniform)
    assert log_likelihood_ratio(logprobs, uniform, uniform) == pytest.approx(0.0, abs=1e-9)
    for other in ([0.6, 0.3, 0.1], [0.5, 0.3, 0.2], estimate + np.array([0.02, -0.01, -0.01])):
        assert best >= log_likelihood_ratio(logprobs, np.asarray(other), uniform)
    assert total_variation(estimate, uniform) == pytest.approx(0.5 * np.abs(estimate - uniform).sum())


def test_a_leaning_method_on_unshifted_traffic_is_left_alone_and_a_clear_shift_still_corrected():
    """A method whose logits favour class 0 by a constant: on balanced traffic EM finds its lean (a
    significant but small shift) and nothing moves; on traffic 86% class 2, adapt corrects towards it."""
    uniform = np.full(3, 1 / 3)
    lean = [1.0, 0.0, 0.0]
    balanced, classes = traffic([1 / 3] * 3, 3000, seed=6, lean=lean)
    shift = PriorShift(Prior.ADAPT, uniform, window=2000, min_samples=200, refit_every=50)
    for start in range(0, 3000, 100):
        rows = torch.as_tensor(balanced[start : start + 100], dtype=torch.float32)
        shift.observe(rows)
        assert torch.equal(shift.correct(rows), rows)
    info = shift.info()
    assert info["estimate"][0] > 0.45 and info["p_value"] < SIGNIFICANCE  # EM reads the lean as a shift
    assert info["distance"] < MIN_SHIFT and info["active"] is False
    plain = prior_predictions(balanced, Prior.POOL, uniform, 16, 200)
    assert np.array_equal(prior_predictions(balanced, Prior.ADAPT, uniform, 16, 200), plain)

    shifted, classes = traffic([0.07, 0.07, 0.86], 3000, seed=7, lean=lean)
    shift = PriorShift(Prior.ADAPT, uniform, window=2000, min_samples=200, refit_every=50)
    shift.observe(torch.as_tensor(shifted[:1000], dtype=torch.float32))
    info = shift.info()
    assert info["active"] is True and int(np.argmax(info["estimate"])) == 2 and info["estimate"][2] > 0.7
    plain = prior_predictions(shifted, Prior.POOL, uniform, 16, 200)
    adapted = prior_predictions(shifted, Prior.ADAPT, uniform, 16, 200)
    assert accuracy_of(adapted[400:], classes[400:]) >= accuracy_of(plain[400:], classes[400:]) + 0.05


def test_a_weak_methods_wandering_estimate_is_noise_to_the_test():
    """Balanced traffic, a method whose classes barely differ: over 200 rows EM's estimate often lies
    past MIN_SHIFT by chance; the likelihood-ratio test says the rows cannot tell, and nothing moves."""
    uniform = np.full(3, 1 / 3)
    distances = []
    for seed in range(40):
        logprobs, _ = traffic([1 / 3] * 3, 200, seed=seed, spread=0.2)
        shift = PriorShift(Prior.ADAPT, uniform, window=200, min_samples=200)
        shift.observe(torch.as_tensor(logprobs, dtype=torch.float32))
        info = shift.info()
        assert info["active"] is False and info["p_value"] >= SIGNIFICANCE
        distances.append(info["distance"])
    assert max(distances) >= MIN_SHIFT


def test_pool_changes_nothing_and_uniform_divides_out_the_pools_frequencies():
    rows = torch.log_softmax(torch.randn(4, 3), -1)
    pool = class_frequencies([0, 0, 0, 1, 2, 2], 3)
    assert torch.equal(PriorShift(Prior.POOL, pool).correct(rows), rows)
    uniform = PriorShift(Prior.UNIFORM, pool).correct(rows)
    torch.testing.assert_close(uniform, rows - torch.log(torch.as_tensor(pool, dtype=torch.float32)))
    balanced = class_frequencies([0, 1, 2], 3)
    assert torch.equal(PriorShift(Prior.UNIFORM, balanced).correct(rows), rows)
    np.testing.assert_allclose(class_frequencies([], 4), [0.25] * 4)


def test_the_eval_scores_adapt_as_the_server_would_see_the_traffic():
    """Streamed in batches: rows before the minimum keep their scores, later ones are corrected."""
    logprobs, classes = traffic([0.86, 0.07, 0.07], 2000, seed=4)
    uniform = np.full(3, 1 / 3)
    plain = prior_predictions(logprobs, Prior.POOL, uniform, 16, 200)
    adapted = prior_predictions(logprobs, Prior.ADAPT, uniform, 16, 200)
    assert np.array_equal(plain, logprobs.argmax(1))
    assert np.array_equal(adapted[:192], plain[:192])  # 12 batches of 16 before 200 rows were seen
    assert accuracy_of(adapted[400:], classes[400:]) >= accuracy_of(plain[400:], classes[400:]) + 0.05


def accuracy_of(preds: np.ndarray, classes: np.ndarray) -> float:
    return float((preds == classes).mean())


def test_an_adapting_task_learns_its_traffic_and_starts_again_when_replaced(serve):
    """Served: once `prior_min_samples` inputs show a clear shift (one input, over and over), the
    task's probabilities move towards the class its traffic is made of; the pool-prior twin beside it
    does not move; a replaced task starts again."""
    adaptive = sentiment_task(name="adaptive", prior="adapt")
    client = serve(tasks=[adaptive, sentiment_task()], prior_min_samples=20, prior_window=60,
                   admin_api_key="admin-secret")

    def probs(task: str) -> list[float]:
        return client.post("/v1/classify", json={"task": task, "input": "a moving match"}).json()["data"][0]["probs"]

    before, twin = probs("adaptive"), probs("sentiment")
    assert before == pytest.approx(twin, abs=1e-6)  # nothing yet: 1 input seen
    info = client.get("/v1/tasks/adaptive").json()["prior"]
    assert info["mode"] == "adapt" and info["samples"] == 1 and info["active"] is False
    favoured = int(np.argmax(before))
    # The tiny model's probabilities say little (0.59 for the favoured class): at 21 inputs EM's
    # estimate is extreme but the test finds it too uncertain to act on; the refit 50 inputs later,
    # on the window's 60, does not.
    for _ in range(2):
        client.post("/v1/classify", json={"task": "adaptive", "input": ["a moving match"] * 10})
    info = client.get("/v1/tasks/adaptive").json()["prior"]
    assert info["samples"] == 21 and info["estimate"][favoured] > 0.9 and info["distance"] >= MIN_SHIFT
    assert info["p_value"] >= SIGNIFICANCE and info["active"] is False
    assert probs("adaptive") == pytest.approx(before, abs=1e-6)
    for _ in range(5):
        client.post("/v1/classify", json={"task": "adaptive", "input": ["a moving match"] * 10})
    info = client.get("/v1/tasks/adaptive").json()["prior"]
    assert info["active"] is True and info["samples"] == 60 and info["estimate"][favoured] > 0.5
    after = probs("adaptive")
    assert after[favoured] > before[favoured] and probs("sentiment") == pytest.approx(twin, abs=1e-6)
    assert client.get("/v1/tasks/sentiment").json()["prior"] == {"mode": "pool", "base": [0.5, 0.5]}
    replaced = client.put("/admin/tasks/adaptive", json=adaptive.model_dump(mode="json") | {"calibrate": True},
                          headers=ADMIN)
    assert replaced.status_code in (201, 202), replaced.text
    if replaced.status_code == 202:
        wait_finished(client, replaced.json()["status_url"])
    assert client.get("/v1/tasks/adaptive").json()["prior"]["samples"] == 0
