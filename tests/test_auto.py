"""`method: auto`: cross-validated choice among the methods, and the accuracy estimate that comes with it."""

from __future__ import annotations

import numpy as np
import pytest

from anchor_cache import Classifier, ValidationError
from anchor_cache.auto import CANDIDATES, COST, TIE, choose, estimate, expected_calibration_error, fit_temperature
from anchor_cache.reweighting import TrainConfig
from tests.conftest import ADMIN, sentiment_task, wait_finished

POOL = [("a fine film", 1), ("a dull mess", 0), ("warm and funny", 1), ("tedious and long", 0),
        ("i loved it", 1), ("i hated it", 0), ("a small gem", 1), ("nothing works", 0)]


def calibrated_rows(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) log-probabilities whose confidence is right on average, and classes drawn from them."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, size=(n, 3))
    logprobs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    gold = np.array([rng.choice(3, p=np.exp(row)) for row in logprobs])
    return logprobs, gold


def test_calibrated_probabilities_have_a_small_ece_and_keep_temperature_one():
    logprobs, gold = calibrated_rows(20_000)
    assert expected_calibration_error(logprobs, gold) < 0.02
    assert fit_temperature(logprobs, gold) == pytest.approx(1.0, abs=0.05)


def test_an_overconfident_model_gets_its_temperature_back():
    logprobs, gold = calibrated_rows(20_000, seed=1)
    sharp = logprobs * 3  # three times too confident
    sharp -= np.logaddexp.reduce(sharp, axis=1, keepdims=True)
    assert fit_temperature(sharp, gold) == pytest.approx(3.0, rel=0.1)
    fixed = estimate(sharp, gold)
    assert fixed.ece < expected_calibration_error(sharp, gold) / 3
    assert fixed.low < fixed.accuracy < fixed.high and fixed.rows == len(gold)


def test_choose_scores_every_candidate_and_picks_the_best_or_a_cheaper_tie(tiny_lm):
    if tiny_lm.model.config.model_type != "llama":
        pytest.skip("the choice does not depend on the model family: one is enough for its cost")
    clf = Classifier(tiny_lm, sentiment_task())
    texts, classes = [t for t, _ in POOL], [c for _, c in POOL]
    cfg = TrainConfig(batch_size=4, lr=0.05, epochs=2)
    done = []
    choice = choose(clf, texts, classes, cfg, seed=3, on_fold=lambda i, n: done.append((i, n)))
    assert done == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert set(choice.scores) == {c.name for c in CANDIDATES}
    assert all(np.isfinite(s["log_loss"]) and 0 <= s["accuracy"] <= 1 for s in choice.scores.values())
    best = min(s["log_loss"] for s in choice.scores.values())
    ties = [name for name, s in choice.scores.items() if s["log_loss"] <= best + TIE]
    assert choice.chosen.name == min(ties, key=COST.get)
    est = choice.estimate
    assert est.rows == len(POOL) and est.low <= est.accuracy <= est.high
    assert est.accuracy == pytest.approx(choice.scores[choice.chosen.name]["accuracy"], abs=1e-4)


def test_choose_needs_two_rows_of_every_class(tiny_lm):
    clf = Classifier(tiny_lm, sentiment_task())
    with pytest.raises(ValidationError, match="at least 2"):
        choose(clf, ["a fine film", "dull", "bad"], [1, 0, 0])


def test_a_task_with_method_auto_serves_its_choice_and_keeps_it_across_a_restart(serve):
    """The build job chooses on the pool; the task then serves the chosen method, shows the choice
    and its estimate, and exposes the estimate as a metric. The record keeps `auto`, so a restart
    loads the stored choice instead of choosing again."""
    pool = [{"text": t, "label": ["Negative", "Positive"][c]} for t, c in POOL]
    spec = sentiment_task(name="picky", method="auto", examples=pool).model_dump(mode="json")
    client = serve(admin_api_key="admin-secret")
    created = client.post("/admin/tasks", json=spec, headers=ADMIN)
    assert created.status_code in (201, 202), created.text
    if created.status_code == 202:
        assert wait_finished(client, created.json()["status_url"], timeout=300)["status"] == "succeeded"
    info = client.get("/v1/tasks/picky").json()
    auto = info["auto"]
    assert auto["chosen"] in {c.name for c in CANDIDATES} and info["method"] == auto["method"]
    assert set(auto["candidates"]) == {c.name for c in CANDIDATES}
    assert auto["estimate"]["low"] <= auto["estimate"]["accuracy"] <= auto["estimate"]["high"]
    assert client.app.state.anchor.store.record("picky").spec["method"] == "auto"
    answer = client.post("/v1/classify", json={"task": "picky", "input": "a fine film"})
    assert answer.status_code == 200 and sum(answer.json()["data"][0]["probs"]) == pytest.approx(1.0, abs=1e-5)
    metrics = client.get("/metrics").text
    assert f'anchorserve_task_estimated_accuracy{{bound="estimate",task="picky"}} {auto["estimate"]["accuracy"]}' \
        in metrics
    restarted = serve(admin_api_key="admin-secret")
    assert restarted.get("/v1/tasks/picky").json()["auto"] == auto  # the same `chosen_at`: not chosen again


def test_the_eval_reports_what_auto_chose_with_every_candidate_beside_it(tiny_lm, dataset_dir):
    from anchor_cache.evaluate import AUTO_VARIANTS, EvalConfig, evaluate, markdown_table

    if tiny_lm.model.config.model_type != "llama":
        pytest.skip("one family is enough for its cost")
    cfg = EvalConfig(data=dataset_dir, template="Review: {text}\nSentiment:", labels=["Negative", "Positive"],
                     methods=["auto"], seeds=[42], limit=6, train_per_class=3, pool_per_class=3,
                     reweight=TrainConfig(epochs=2, batch_size=4), priors=["pool", "adapt"])
    results = evaluate(tiny_lm, cfg, progress=False)
    methods = results["methods"]
    assert set(AUTO_VARIANTS.values()) | {"auto", "vanilla"} == set(methods)
    seed = methods["auto"]["per_seed"][0]
    assert seed["accuracy"] == methods[AUTO_VARIANTS[seed["chosen"]]]["per_seed"][0]["accuracy"]
    assert seed["estimate_covers"] == (seed["estimate"]["low"] <= seed["accuracy"] / 100 <= seed["estimate"]["high"])
    assert set(seed["accuracy_by_prior"]) == {"pool", "adapt"}
    assert f"auto, seed 42: chose {seed['chosen']}" in markdown_table(results)
