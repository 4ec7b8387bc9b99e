"""`method: auto`: cross-validated choice among the methods, and the accuracy estimate that comes with it."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from anchor_cache import Classifier, ValidationError
from anchor_cache.auto import (
    CANDIDATES,
    COST,
    TIE,
    FoldInputs,
    _fit_fold,
    choose,
    curve_weight,
    estimate,
    expected_calibration_error,
    fit_temperature,
    fold_designs,
    learning_curve,
    out_of_fold,
    rescaled,
)
from anchor_cache.blobs import save_choice
from anchor_cache.heads import head_layers
from anchor_cache.registry import TaskRegistry, provisional, resolved
from anchor_cache.reweighting import TrainConfig, pool_hash, train_reweighting
from anchor_cache.task import Method
from server.store.local import LocalStore
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


def _answers(correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-class log-probabilities that are right exactly where `correct` is, and their classes."""
    gold = np.zeros(len(correct), dtype=int)
    logprobs = np.where(correct[:, None], np.log([[0.8, 0.2]]), np.log([[0.2, 0.8]]))
    return logprobs, gold


def test_the_interval_for_a_number_of_rows_covers_what_that_many_rows_measure():
    """A method right on 75% of rows: estimated on 96 pool rows, checked on 200 new rows. The
    estimate's own interval is for the accuracy on unlimited rows, so the 200 rows' own spread takes
    it below 95%; the interval for 200 rows holds their accuracy 95% of the time."""
    rng = np.random.default_rng(0)
    plain = for_rows = 0
    draws = 2000
    for _ in range(draws):
        est = estimate(*_answers(rng.random(96) < 0.75))
        measured = float((rng.random(200) < 0.75).mean())
        plain += est.covers(measured)
        for_rows += est.covers(measured, 200)
    assert plain / draws < 0.92
    assert 0.93 <= for_rows / draws <= 0.97
    with pytest.raises(ValueError, match="at least one row"):
        est.for_rows(0)


def test_the_fold_designs_are_half_the_pool_and_seven_eighths_where_every_class_allows():
    assert fold_designs(np.repeat([0, 1], 16), 2) == (2, 8)
    assert fold_designs(np.repeat([0, 1, 2], [5, 16, 16]), 3) == (2, 5)
    assert fold_designs(np.repeat([0, 1], 2), 2) == (2,)
    with pytest.raises(ValidationError, match="at least 2"):
        fold_designs(np.array([0, 1, 1]), 2)


@pytest.mark.parametrize("folds", [(2, 8), (2, 5), (2, 3)])
def test_the_curve_weight_recovers_a_score_linear_in_one_over_the_rows(folds):
    """A per-row score a + b / rows, measured where each design's folds learn from (k − 1)/k of the
    pool, extrapolates to its value at the whole pool."""
    n, a, b = 96, 0.3, 12.0
    fewest, most = (a + b / (n * (k - 1) / k) for k in folds)
    assert most + curve_weight(folds) * (most - fewest) == pytest.approx(a + b / n)
    assert curve_weight((4,)) == 0.0


def test_the_extrapolation_moves_the_estimate_and_widens_its_interval():
    gold = np.arange(40) % 2
    right, wrong = np.log([[0.9, 0.1], [0.1, 0.9]])[gold], np.log([[0.1, 0.9], [0.9, 0.1]])[gold]
    fewer = np.where(np.arange(40)[:, None] < 20, wrong, right)  # half the rows wrong when learning from fewer
    more = np.where(np.arange(40)[:, None] < 10, wrong, right)  # a quarter
    plain, curved = estimate(more, gold), estimate(more, gold, fewer, weight=1 / 6)
    assert plain.accuracy == 0.75 and plain.correction == 0.0
    assert curved.correction == pytest.approx(0.25 / 6) and curved.accuracy == pytest.approx(0.75 + 0.25 / 6)
    assert curved.high - curved.low > plain.high - plain.low and curved.low <= curved.accuracy <= curved.high


def _centroid_scores(x: np.ndarray, y: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Nearest class mean, as (N, 2) log-probabilities: in many dimensions its accuracy grows with rows."""
    means = np.stack([x[y == c].mean(0) for c in (0, 1)])
    scores = -2 * ((query[:, None, :] - means[None]) ** 2).mean(-1)
    return scores - np.logaddexp.reduce(scores, axis=1, keepdims=True)


def test_the_learning_curve_estimate_is_nearer_the_whole_pool_accuracy_than_plain_4_fold():
    """On synthetic pools of 32 rows whose classifier gains from every row, 4-fold cross-validation
    (each fold learning from 24) falls short of what the classifier fitted on all 32 scores on fresh
    rows; the extrapolated estimate falls short by less than half as much, over 150 pools, and its
    correction (beyond learning from 7/8 of the pool) is upward on average."""
    def draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % 2
        x = rng.normal(size=(n, 200))
        x[:, 0] += 1.5 * (2 * y - 1)
        return x, y

    plain, curved, corrections = [], [], []
    for seed in range(150):
        rng = np.random.default_rng(seed)
        x, y = draw(rng, 32)
        fresh, fresh_y = draw(rng, 1000)
        truth = float((_centroid_scores(x, y, fresh).argmax(1) == fresh_y).mean())

        def fit_fold(train: np.ndarray, held: np.ndarray, x: np.ndarray = x, y: np.ndarray = y
                     ) -> dict[str, np.ndarray]:
            return {"head": _centroid_scores(x[train], y[train], x[held])}

        four = out_of_fold(fit_fold, y, 2, folds=4, seed=seed)["head"]
        plain.append(float((four.argmax(1) == y).mean()) - truth)
        curve = learning_curve(fit_fold, y, 2, seed)
        assert curve.folds == (2, 8)
        found = estimate(curve.most["head"], y, curve.fewest["head"], curve_weight(curve.folds))
        curved.append(found.accuracy - truth)
        corrections.append(found.correction)
    assert np.mean(plain) < -0.015  # the pessimism the correction is for
    assert abs(np.mean(curved)) < abs(np.mean(plain)) / 2
    assert np.mean(corrections) > 0.005


def test_choose_scores_every_candidate_and_picks_the_best_or_a_cheaper_tie(tiny_lm):
    if tiny_lm.model.config.model_type != "llama":
        pytest.skip("the choice does not depend on the model family: one is enough for its cost")
    clf = Classifier(tiny_lm, sentiment_task())
    texts, classes = [t for t, _ in POOL], [c for _, c in POOL]
    cfg = TrainConfig(batch_size=4, lr=0.05, epochs=2)
    done = []
    choice = choose(clf, texts, classes, cfg, seed=3, on_fold=lambda i, n: done.append((i, n)))
    assert done == [(i, 6) for i in range(1, 7)]  # 2 folds, then 4: four rows per class allow no more
    assert choice.folds == (2, 4) and choice.info()["folds"] == [2, 4] and choice.seconds > 0
    assert set(choice.scores) == {c.name for c in CANDIDATES}
    assert all(np.isfinite(s["log_loss"]) and 0 <= s["accuracy"] <= 1 for s in choice.scores.values())
    best = min(s["log_loss"] for s in choice.scores.values())
    ties = [name for name, s in choice.scores.items() if s["log_loss"] <= best + TIE]
    assert choice.chosen.name == min(ties, key=COST.get)
    est = choice.estimate
    assert est.rows == len(POOL) and est.low <= est.accuracy <= est.high
    assert est.accuracy == pytest.approx(choice.scores[choice.chosen.name]["accuracy"], abs=1e-4)
    for name in ("zero_shot", "hidden_anchor"):  # they learn nothing from the pool: nothing to extrapolate
        assert choice.scores[name]["log_loss"] == choice.scores[name]["cv_log_loss"]


def test_every_candidate_is_evaluated_as_the_task_its_choice_serves():
    from anchor_cache.evaluate import VARIANTS

    spec = sentiment_task(method="auto", examples=[{"text": t, "label": ["Negative", "Positive"][c]} for t, c in POOL])
    for candidate in CANDIDATES:
        served = resolved(spec, {"method": candidate.method, "reweight": candidate.reweight})
        variant = VARIANTS[candidate.name]
        evaluated = variant.head or (Method.MANY_SHOT if variant.many_shot else variant.base)
        assert (evaluated, variant.reweighted) == (served.method, served.reweight), candidate.name


def test_a_fold_scores_its_heads_as_a_task_fitted_on_its_rows_would(tiny_lm):
    """kNN is fitted per fold on the pool's features read once, the head under β on the fold's own
    forwards; a task whose pool is the fold's rows (and β the fold's) scores the held rows alike."""
    if tiny_lm.model.config.model_type != "llama":
        pytest.skip("one family is enough: the heads do not depend on it")
    clf = Classifier(tiny_lm, sentiment_task())
    texts, gold = [t for t, _ in POOL], np.array([c for _, c in POOL])
    train, held = np.array([0, 1, 2, 3, 5, 6]), np.array([4, 7])
    knn_features = clf.features(texts, Method.HIDDEN_ANCHOR, head_layers(Method.KNN, tiny_lm.num_layers))
    cfg = TrainConfig(batch_size=4, epochs=1)
    fold = _fit_fold(FoldInputs(clf, texts, gold, cfg, knn_features), None, train, held)
    rows, part = [texts[i] for i in train], [texts[i] for i in held]
    beta = train_reweighting(clf, rows, gold[train].tolist(), cfg, progress=False).beta
    for name, method, b in (("knn", Method.KNN, None), ("linear_head_reweighted", Method.LINEAR_HEAD, beta)):
        head = clf.fit_head(method, rows, gold[train], b)
        scores = head.scores(clf.features(part, Method.HIDDEN_ANCHOR, head.layers, b))
        np.testing.assert_allclose(fold[name], torch.log_softmax(scores, -1).numpy(), atol=1e-4, err_msg=name)


def test_a_stored_choice_made_among_other_candidates_is_made_again(tiny_lm, tmp_path):
    reg = TaskRegistry(tiny_lm, LocalStore(tmp_path), max_tasks=4, max_demo_tokens=512)
    pool = [{"text": t, "label": ["Negative", "Positive"][c]} for t, c in POOL]
    spec = sentiment_task(name="picky", method="auto", examples=pool)
    clf = Classifier(tiny_lm, provisional(spec))
    info = {"chosen": "knn", "method": "knn", "reweight": False, "pool": pool_hash(clf),
            "candidates": {c.name: {} for c in CANDIDATES},
            "estimate": {"accuracy": 0.8, "low": 0.7, "high": 0.9, "temperature": 1.0}}
    save_choice(reg.store, reg.choice_key(spec, clf), info)
    served = reg.prepare(spec)
    assert not reg.needs_choice(served) and served.spec.method == Method.KNN
    save_choice(reg.store, reg.choice_key(spec, clf), info | {"candidates": {c.name: {} for c in CANDIDATES[1:]}})
    assert reg.needs_choice(reg.prepare(spec))


def test_the_accuracy_on_traffic_starts_again_when_beta_changes(tiny_lm, tmp_path):
    """Rows served under one β say nothing of the method under another."""
    reg = TaskRegistry(tiny_lm, LocalStore(tmp_path), max_tasks=4, max_demo_tokens=512, traffic_window=10,
                       traffic_min_samples=1)
    pool = [{"text": t, "label": ["Negative", "Positive"][c]} for t, c in POOL]
    spec = sentiment_task(name="picky", method="auto", examples=pool)
    clf = Classifier(tiny_lm, provisional(spec))
    save_choice(reg.store, reg.choice_key(spec, clf),
                {"chosen": "hidden_anchor", "method": "hidden_anchor", "reweight": False, "pool": pool_hash(clf),
                 "candidates": {c.name: {} for c in CANDIDATES},
                 "estimate": {"accuracy": 0.8, "low": 0.7, "high": 0.9, "temperature": 1.0}})
    served = reg.prepare(spec)
    served.logprobs(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), served.spec.method)
    assert served.traffic.reading()[0] == 2
    assert reg.with_beta(served, None, None).traffic.reading() == (0, None)


def test_choose_needs_two_rows_of_every_class(tiny_lm):
    clf = Classifier(tiny_lm, sentiment_task())
    with pytest.raises(ValidationError, match="at least 2"):
        choose(clf, ["a fine film", "dull", "bad"], [1, 0, 0])


def test_a_task_with_method_auto_serves_its_choice_and_keeps_it_across_a_restart(serve, caplog):
    """The build job chooses on the pool, logging each fold; the task then serves the chosen method,
    shows the choice and its estimate, and exposes the estimate as a metric. The record keeps
    `auto`, so a restart loads the stored choice instead of choosing again."""
    caplog.set_level(logging.INFO, logger="anchor_cache.registry")
    pool = [{"text": t, "label": ["Negative", "Positive"][c]} for t, c in POOL]
    spec = sentiment_task(name="picky", method="auto", examples=pool).model_dump(mode="json")
    client = serve(admin_api_key="admin-secret", traffic_window=10, traffic_min_samples=3)
    created = client.post("/admin/tasks", json=spec, headers=ADMIN)
    assert created.status_code in (201, 202), created.text
    if created.status_code == 202:
        assert wait_finished(client, created.json()["status_url"], timeout=300)["status"] == "succeeded"
    info = client.get("/v1/tasks/picky").json()
    assert info["learning"] is None
    folds = [r.getMessage() for r in caplog.records if "choosing its method, fold" in r.getMessage()]
    assert folds and folds[-1].endswith(f"fold {len(folds)}/{len(folds)}")
    auto = info["auto"]
    assert auto["chosen"] in {c.name for c in CANDIDATES} and info["method"] == auto["method"]
    assert set(auto["candidates"]) == {c.name for c in CANDIDATES}
    assert auto["estimate"]["low"] <= auto["estimate"]["accuracy"] <= auto["estimate"]["high"]
    assert client.app.state.anchor.store.record("picky").spec["method"] == "auto"
    assert info["traffic"]["samples"] == 0 and info["traffic"]["accuracy"] is None
    answer = client.post("/v1/classify", json={"task": "picky", "input": "a fine film"})
    assert answer.status_code == 200 and sum(answer.json()["data"][0]["probs"]) == pytest.approx(1.0, abs=1e-5)
    served = [max(answer.json()["data"][0]["probs"])]
    assert client.get("/v1/tasks/picky").json()["traffic"]["accuracy"] is None  # 1 of min_samples
    answer = client.post("/v1/classify", json={"task": "picky", "input": [t for t, _ in POOL[:4]]})
    served += [max(row["probs"]) for row in answer.json()["data"]]
    other = {"task": "picky", "input": "a dull mess", "method": "vanilla"}  # not the task's own: not its traffic
    assert client.post("/v1/classify", json=other).status_code == 200
    traffic = client.get("/v1/tasks/picky").json()["traffic"]
    assert traffic["samples"] == 5 and traffic["accuracy"] == pytest.approx(np.mean(served), abs=1e-3)
    metrics = client.get("/metrics").text
    assert f'anchorserve_task_estimated_accuracy{{bound="estimate",task="picky"}} {auto["estimate"]["accuracy"]}' \
        in metrics
    assert 'anchorserve_task_traffic_accuracy{bound="low",task="picky"}' in metrics
    restarted = serve(admin_api_key="admin-secret")
    assert restarted.get("/v1/tasks/picky").json()["auto"] == auto  # the same `chosen_at`: not chosen again


def test_the_eval_reports_what_auto_chose_with_every_candidate_beside_it(tiny_lm, dataset_dir):
    from anchor_cache.evaluate import EvalConfig, evaluate, markdown_table

    if tiny_lm.model.config.model_type != "llama":
        pytest.skip("one family is enough for its cost")
    cfg = EvalConfig(data=dataset_dir, template="Review: {text}\nSentiment:", labels=["Negative", "Positive"],
                     methods=["auto"], seeds=[42], limit=6, train_per_class=3, pool_per_class=3,
                     reweight=TrainConfig(epochs=2, batch_size=4), priors=["pool", "adapt"])
    results = evaluate(tiny_lm, cfg, progress=False)
    methods = results["methods"]
    assert {c.name for c in CANDIDATES} | {"auto", "vanilla"} == set(methods)
    seed = methods["auto"]["per_seed"][0]
    assert seed["accuracy"] == methods[seed["chosen"]]["per_seed"][0]["accuracy"]
    assert seed["estimate_covers"] == (seed["estimate"]["low"] <= seed["accuracy"] / 100 <= seed["estimate"]["high"])
    low, high = seed["test_rows_interval"]
    assert low <= seed["estimate"]["low"] and seed["estimate"]["high"] <= high  # the test rows' own spread added
    assert seed["test_rows_interval_covers"] == (low <= seed["accuracy"] / 100 <= high)
    predictions = seed["predictions"]
    assert len(predictions["test"]) == len(predictions["test_gold"]) == seed["n"]
    served = np.exp(rescaled(np.array(predictions["test"]), seed["estimate"]["temperature"])).max(1)
    assert seed["traffic_estimate"][0] == pytest.approx(served.mean(), abs=1e-3)  # the rows' served top probabilities
    assert set(seed["accuracy_by_prior"]) == {"pool", "adapt"}
    assert f"auto, seed 42: chose {seed['chosen']}" in markdown_table(results)
