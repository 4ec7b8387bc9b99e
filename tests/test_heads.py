"""Heads on anchor-context features and many-shot anchors: exact against their
references, and wired into the eval's methods."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from anchor_cache import Classifier, Demonstration, Method, TaskSpec, load_model
from anchor_cache.attention import AttentionPlan
from anchor_cache.cache import extend_cache, merge_anchor_caches
from anchor_cache.errors import ValidationError
from anchor_cache.evaluate import EvalConfig, evaluate
from anchor_cache.forward import Prefix, label_logits, last_hidden
from anchor_cache.heads import (
    LABEL_WEIGHTS,
    LINEAR_C,
    FeatureLayers,
    Features,
    LinearDesign,
    fit_knn_head,
    fit_linear_head,
    read_features,
    select_layers,
)
from anchor_cache.many_shot import groups_of, many_shot_cache
from anchor_cache.packed import PackedRow, packed_label_logits
from tests.conftest import QUERIES, error_of, sentiment_task


def blobs(n_classes: int, per_class: int = 12, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (n_classes, dim))
    x = np.concatenate([centres[c] + rng.normal(0, 1, (per_class, dim)) for c in range(n_classes)])
    return torch.tensor(x, dtype=torch.float32), np.repeat(np.arange(n_classes), per_class)


def with_logits(hidden: torch.Tensor, n_classes: int, seed: int = 0) -> Features:
    return Features(hidden, torch.tensor(np.random.default_rng(seed).normal(0, 2, (len(hidden), n_classes)),
                                         dtype=torch.float32))


LAYERS = FeatureLayers(last=(3,))


def raw_design(features: Features, scaler: StandardScaler, label_weight: float) -> np.ndarray:
    """The regression's input written out on the raw features: standardised hidden, scaled label log-probs."""
    logprobs = torch.log_softmax(features.label_logits, dim=-1).numpy()
    return np.hstack([scaler.transform(features.hidden.numpy()), label_weight * logprobs])


@pytest.mark.parametrize(("n_classes", "dim"), [(2, 16), (3, 16), (14, 16), (3, 400)])
def test_linear_head_is_the_raw_feature_regression_folded_into_two_matmuls(n_classes, dim):
    """Fitted on principal coordinates, it equals scikit-learn's regression on all raw features (with
    more features than rows, too: the L2 prior keeps the weights in the rows' span)."""
    x, y = blobs(n_classes, dim=dim)
    pool = with_logits(x, n_classes)
    head = fit_linear_head(pool, y, n_classes, LAYERS, label_weight=3.0)
    scaler = StandardScaler().fit(x.numpy())
    reference = LogisticRegression(C=LINEAR_C, max_iter=5000, tol=1e-8).fit(raw_design(pool, scaler, 3.0), y)
    queries = with_logits(blobs(n_classes, per_class=5, dim=dim, seed=1)[0], n_classes, seed=1)
    scores = head.scores(queries)
    assert scores.shape == (len(queries.hidden), n_classes) and head.weight.shape == (n_classes, x.shape[1])
    assert head.label_weight.shape == (n_classes, n_classes) and head.chosen_label_weight == 3.0
    expected = reference.predict_proba(raw_design(queries, scaler, 3.0))
    # 14 classes on 70 rows is ill-conditioned enough that scikit-learn's own solvers (lbfgs and
    # newton-cg at tol 1e-10) disagree by 3e-2 on some machines' BLAS: there, probabilities within
    # that spread.
    atol = 5e-2 if n_classes == 14 else 2e-3
    got = torch.softmax(scores.double(), -1).numpy()
    np.testing.assert_allclose(got, expected, atol=atol)


def test_the_label_words_weight_is_chosen_on_the_pool():
    """Label logits that tell the class outweigh noise features; label logits that lie are ignored."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 16)
    noise = torch.tensor(rng.normal(0, 1, (len(y), 32)), dtype=torch.float32)
    telling = torch.tensor(np.eye(3)[y] * 4 + rng.normal(0, 0.5, (len(y), 3)), dtype=torch.float32)
    assert fit_linear_head(Features(noise, telling), y, 3, LAYERS).chosen_label_weight == max(LABEL_WEIGHTS)
    x, _ = blobs(3, per_class=16)
    lying = torch.tensor(np.eye(3)[rng.permutation(y)] * 4, dtype=torch.float32)
    assert fit_linear_head(Features(x, lying), y, 3, LAYERS).chosen_label_weight == 0.0


def test_the_fold_maps_principal_coordinates_back_to_raw_features_exactly():
    x, _ = blobs(3, dim=400)
    design = LinearDesign.fit(x.numpy().astype(np.float64))
    rng = np.random.default_rng(2)
    coef, intercept = rng.normal(size=(3, design.pca.n_components_)), rng.normal(size=3)
    weight, bias = design.fold(coef, intercept)
    queries = blobs(3, per_class=5, dim=400, seed=1)[0].numpy().astype(np.float64)
    coordinates = design.pca.transform(design.scaler.transform(queries))
    np.testing.assert_allclose(queries @ weight.T + bias, coordinates @ coef.T + intercept, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("telling", ["last", "mean"])
def test_the_layers_are_chosen_on_the_pool_and_the_head_reads_only_them(telling):
    """Features of two layers, one telling the class and one noise: the head picks the telling one,
    and scores features of that layer alone."""
    rng = np.random.default_rng(0)
    x, y = blobs(3, per_class=16)
    noise = torch.tensor(rng.normal(0, 3, x.shape), dtype=torch.float32)
    both = FeatureLayers(last=(4,), mean=(7,))  # read_features: the last-token block, then the mean block
    hidden = torch.cat([x, noise] if telling == "last" else [noise, x], dim=1)
    lying = torch.tensor(np.eye(3)[rng.permutation(y)], dtype=torch.float32)
    choices = {"last": FeatureLayers(last=(4,)), "mean": FeatureLayers(mean=(7,))}
    head = fit_linear_head(Features(hidden, lying), y, 3, both, choices=list(choices.values()))
    assert head.layers == choices[telling] and head.weight.shape == (3, x.shape[1])
    assert (head.scores(Features(x, lying)).argmax(-1).numpy() == y).mean() > 0.9
    with pytest.raises(ValidationError, match="do not read"):
        fit_linear_head(Features(hidden, lying), y, 3, both, choices=[FeatureLayers(last=(5,))])


def test_features_read_the_last_token_and_the_mean_of_each_row():
    states = [torch.arange(24, dtype=torch.float32).reshape(6, 4) * (i + 1) for i in range(3)]
    first, last = torch.tensor([0, 2]), torch.tensor([1, 5])  # rows: tokens 0-1 and 2-5
    got = read_features(states, first, last, FeatureLayers(last=(2,), mean=(1,)))
    expected = torch.stack([torch.cat([states[2][int(b)], states[1][int(a) : int(b) + 1].mean(0)])
                            for a, b in zip(first, last, strict=True)])
    torch.testing.assert_close(got, expected)


def test_selecting_layers_from_a_wider_read_equals_reading_them():
    states = [torch.randn(6, 4) for _ in range(4)]
    first, last = torch.tensor([0, 2]), torch.tensor([1, 5])
    wide, logits = FeatureLayers(last=(1, 2, 3), mean=(0, 2, 3)), torch.randn(2, 2)
    read = Features(read_features(states, first, last, wide), logits)
    narrows = (FeatureLayers(last=(3,), mean=(2,)), FeatureLayers(last=(1,), mean=(0, 3)), FeatureLayers(mean=(2,)))
    for narrow in narrows:
        picked = select_layers(read, wide, narrow)
        torch.testing.assert_close(picked.hidden, read_features(states, first, last, narrow))
        assert picked.label_logits is logits
    with pytest.raises(ValueError, match="not among them"):
        select_layers(read, wide, FeatureLayers(last=(0,)))


def test_knn_head_votes_among_the_nearest_rows():
    keys = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 1.0]])
    head = fit_knn_head(with_logits(keys, 2), np.array([0, 0, 1, 1, 1]), 2, LAYERS, k=2)
    assert head.scores(with_logits(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), 2)).argmax(-1).tolist() == [0, 1]
    # votes are weighted by similarity: two close rows outvote three far ones
    far = fit_knn_head(with_logits(keys, 2), np.array([0, 0, 1, 1, 1]), 2, LAYERS, k=5)
    assert far.scores(with_logits(torch.tensor([[1.0, 0.0]]), 2)).argmax() == 0


def test_a_head_needs_every_class_in_its_pool():
    x, y = blobs(3)
    pool = with_logits(x[y < 2], 3)
    with pytest.raises(ValidationError, match=r"classes \[2\]"):
        fit_linear_head(pool, y[y < 2], 3, LAYERS)
    with pytest.raises(ValidationError, match=r"classes \[2\]"):
        fit_knn_head(pool, y[y < 2], 3, LAYERS)


def test_the_final_layer_of_a_packed_forward_is_the_served_hidden_state(tiny_lm):
    clf = Classifier(tiny_lm, sentiment_task())
    layers = FeatureLayers(last=(tiny_lm.num_layers,))
    features = clf.features(QUERIES, Method.HIDDEN_ANCHOR, layers)
    torch.testing.assert_close(features.hidden, clf.hidden_states(QUERIES, Method.HIDDEN_ANCHOR).float(),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(features.label_logits, clf.label_logits(QUERIES, Method.HIDDEN_ANCHOR),
                               atol=1e-5, rtol=1e-4)


def test_many_shot_groups_one_row_per_class_in_label_order():
    task = sentiment_task()
    demos = [Demonstration(text=f"p{i}", label="Positive") for i in range(3)] + [
        Demonstration(text=f"n{i}", label="Negative") for i in range(2)]
    groups = groups_of(task, demos)
    assert [[d.text for d in g] for g in groups] == [["n0", "p0"], ["n1", "p1"], ["p2"]]


def test_one_group_many_shot_is_hidden_anchor_and_more_groups_add_their_anchors(tiny_lm):
    task = sentiment_task()
    positive, negative = Classifier(tiny_lm, task).prompt.demonstrations[:2]
    group = [negative, positive]  # one per class, in label order: how many_shot groups them
    single = many_shot_cache(tiny_lm, task, group)
    alone = Classifier(tiny_lm, task, demonstrations=group)
    expected = alone.label_logits(QUERIES, Method.HIDDEN_ANCHOR)
    merged = Classifier(tiny_lm, task, demonstrations=group)
    merged.install_cache(Method.HIDDEN_ANCHOR, single)
    torch.testing.assert_close(merged.label_logits(QUERIES, Method.HIDDEN_ANCHOR), expected)
    base = alone.prefix(Method.HIDDEN_ANCHOR).cache
    two = merge_anchor_caches([base, base])
    assert two.num_tokens == 2 * base.num_tokens and two.context_length == base.context_length
    assert two.label_slots == base.label_slots + tuple(s + base.num_tokens for s in base.label_slots)
    merged.install_cache(Method.HIDDEN_ANCHOR, two)
    assert not torch.allclose(merged.label_logits(QUERIES, Method.HIDDEN_ANCHOR), expected)  # unscaled: more mass


def _logits_every_path(clf: Classifier, beta: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Hidden_anchor label logits of QUERIES: packed (one SDPA call and span by span), padded, explicit."""
    rw = clf.reweighting(Method.HIDDEN_ANCHOR, beta) if beta is not None else None
    rows = [PackedRow(clf.prefix(Method.HIDDEN_ANCHOR), tuple(q), tuple(clf.prompt.label_ids), rw)
            for q in clf.encode(QUERIES)]
    plan = AttentionPlan(reweighting=rw)
    with torch.inference_mode():
        out = {f"packed/{b}": torch.stack(packed_label_logits(clf.lm, rows, block_tokens=b)) for b in (None, 4)}
        for name, p in (("padded", plan), ("explicit", dataclasses.replace(plan, explicit=True))):
            hidden = last_hidden(clf.lm, clf.prefix(Method.HIDDEN_ANCHOR), clf.encode(QUERIES), p)
            out[name] = label_logits(clf.lm, hidden, clf.prompt.label_ids)
    return out


@pytest.mark.parametrize("groups", [2, 3])
def test_g_copies_of_a_group_under_the_log_1_over_g_bias_are_that_group_on_every_path(tiny_lm, groups):
    """Structured prompting's rescaling, exact where it must be: G identical groups whose keys all carry
    log(1/G) hold the attention one group holds, with and without β, on the packed (whole and
    blocked), padded and explicit paths."""
    clf = Classifier(tiny_lm, sentiment_task())
    base = clf.prefix(Method.HIDDEN_ANCHOR).cache
    merged = merge_anchor_caches([base] * groups)
    copies = Classifier(tiny_lm, sentiment_task())
    copies.install_cache(Method.HIDDEN_ANCHOR, dataclasses.replace(
        merged, key_bias=torch.full((merged.num_tokens,), -math.log(groups))))
    torch.manual_seed(0)
    beta = torch.randn_like(clf.zero_beta())
    for b in (None, beta):
        expected = clf.label_logits(QUERIES, Method.HIDDEN_ANCHOR, beta=b)
        for path, logits in _logits_every_path(copies, b).items():
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4, msg=f"{path}, beta={b is not None}")
    unbiased = Classifier(tiny_lm, sentiment_task())
    unbiased.install_cache(Method.HIDDEN_ANCHOR, merged)
    assert (unbiased.label_logits(QUERIES, Method.HIDDEN_ANCHOR) - expected).abs().max() > 1e-3


def test_many_shot_cache_biases_every_anchor_and_its_paths_agree(tiny_lm):
    task = sentiment_task()
    many = Classifier(tiny_lm, task)
    demos = [*POOL, *many.prompt.demonstrations]
    cache = many_shot_cache(tiny_lm, task, demos)
    groups = len(groups_of(task, demos))
    assert groups > 2
    torch.testing.assert_close(cache.key_bias, torch.full((cache.num_tokens,), -math.log(groups)))
    many.install_cache(Method.HIDDEN_ANCHOR, cache)
    torch.manual_seed(1)
    paths = _logits_every_path(many, torch.randn_like(many.zero_beta()))
    for path, logits in paths.items():
        torch.testing.assert_close(logits, paths["explicit"], atol=1e-5, rtol=1e-4, msg=path)


def test_extending_a_biased_cache_keeps_its_bias(tiny_lm):
    """β training caches each query's tokens but its last behind the prefix (extend_cache) and runs the
    last one alone: that must equal the whole query behind a many-shot cache."""
    task = sentiment_task()
    many = Classifier(tiny_lm, task)
    many.install_cache(Method.HIDDEN_ANCHOR, many_shot_cache(tiny_lm, task, [*POOL, *many.prompt.demonstrations]))
    prefix = many.prefix(Method.HIDDEN_ANCHOR)
    query = many.encode([QUERIES[0]])[0]
    extended = extend_cache(tiny_lm, prefix.cache, query[:-1])
    assert extended.key_bias.shape == (prefix.cache.num_tokens + len(query) - 1,)
    with torch.inference_mode():
        whole = last_hidden(tiny_lm, prefix, [query])
        stepped = last_hidden(tiny_lm, Prefix(cache=extended), [[query[-1]]])
    torch.testing.assert_close(stepped, whole, atol=1e-5, rtol=1e-4)


def test_eval_runs_the_pool_methods_with_disjoint_pools(tiny_lm, dataset_dir):
    cfg = EvalConfig(data=dataset_dir, template="Review: {text}\nSentiment:", labels=["Negative", "Positive"],
                     methods=["linear_head", "knn", "many_shot"], seeds=[1, 2], limit=4, pool_per_class=2)
    result = evaluate(tiny_lm, cfg, progress=False)
    assert set(result["methods"]) == {"vanilla", "linear_head", "knn", "many_shot"}
    anchor_bytes = result["methods"]["many_shot"]["kv_cache_bytes"]
    assert result["methods"]["linear_head"]["kv_cache_bytes"] < anchor_bytes  # a head, not a second cache
    assert all(len(m["per_seed"]) == 2 for m in result["methods"].values())


POOL = [Demonstration(text=t, label=label) for t, label in [
    ("a warm and moving story", "Positive"), ("the fox was wonderful", "Positive"), ("a moving report", "Positive"),
    ("dull from the start", "Negative"), ("lifeless and a waste", "Negative"), ("the markets fell", "Negative")]]


@pytest.mark.parametrize("method", [Method.LINEAR_HEAD, Method.KNN, Method.MANY_SHOT])
def test_pool_methods_packed_with_other_tasks_equal_one_at_a_time(tiny_lm, method):
    pooled = Classifier(tiny_lm, sentiment_task(examples=POOL, method=method))
    other = Classifier(tiny_lm, sentiment_task(name="other", template="Text: {text}\nSentiment:"))
    alone = [pooled.label_logits_ids([q], method)[0] for q in pooled.encode(QUERIES)]
    rows = [r for q in pooled.encode(QUERIES) for r in (pooled.packed_row(q, method),
                                                         other.packed_row(q, Method.HIDDEN_ANCHOR))]
    packed = packed_label_logits(tiny_lm, rows)
    for mine, reference in zip(packed[::2], alone, strict=True):
        torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-4)
    if method != Method.MANY_SHOT:  # a head: one matmul on the Hidden_anchor features
        head = pooled.head(method)
        features = pooled.features(QUERIES, Method.HIDDEN_ANCHOR, head.layers)
        torch.testing.assert_close(torch.stack(alone), head.scores(features), atol=1e-5, rtol=1e-4)


def test_a_pool_method_needs_a_pool_and_a_head_takes_no_calibration():
    with pytest.raises(ValueError, match="needs the task's labelled pool"):
        sentiment_task(method=Method.LINEAR_HEAD)
    with pytest.raises(ValueError, match="`calibrate` does not apply"):
        sentiment_task(method=Method.KNN, examples=POOL, calibrate=True)


def test_calibration_defaults_to_on_only_for_a_label_word_task_without_a_pool():
    assert sentiment_task().calibrate is True
    assert sentiment_task(method=Method.ZERO_SHOT).calibrate is True
    assert sentiment_task(examples=POOL).calibrate is False
    assert sentiment_task(examples=POOL, method=Method.KNN).calibrate is False
    assert sentiment_task(calibrate=False).calibrate is False
    assert sentiment_task(examples=POOL, calibrate=True).calibrate is True
    stored = sentiment_task().model_dump(mode="json")
    assert TaskSpec.model_validate(stored) == sentiment_task()  # a stored spec keeps what it was built with


def test_the_server_serves_a_pool_method_as_the_engine_does(serve, model_dir):
    spec = sentiment_task(examples=POOL, method=Method.KNN)  # knn learns no β: the engine's plain answer
    client = serve(tasks=[spec, sentiment_task(name="plain")])
    served = client.post("/v1/classify", json={"task": "sentiment", "input": QUERIES}).json()["data"]
    local = Classifier(load_model(str(model_dir), device="cpu", dtype="float32"), spec).classify(QUERIES)
    for item, prediction in zip(served, local, strict=True):
        assert item["label"] == prediction.label
        np.testing.assert_allclose(item["probs"], list(prediction.probs.values()), atol=1e-5)
    linear = client.post("/v1/classify", json={"task": "sentiment", "input": QUERIES, "method": "linear_head"})
    assert linear.status_code == 200, linear.text
    error_of(client.post("/v1/classify", json={"task": "plain", "input": QUERIES, "method": "knn"}), 400, "validation")


def test_a_head_is_fitted_again_under_a_new_beta(tiny_lm):
    clf = Classifier(tiny_lm, sentiment_task(examples=POOL, method=Method.LINEAR_HEAD))
    plain = clf.head(Method.LINEAR_HEAD)
    assert clf.head(Method.LINEAR_HEAD) is plain  # fitted once
    beta = torch.full_like(clf.zero_beta(), 2.0)
    under_beta = clf.head(Method.LINEAR_HEAD, beta)
    assert under_beta is not plain and not torch.equal(under_beta.weight, plain.weight)
    pool = clf.pool()
    labels = np.array([clf.task.label_index(d.label) for d in pool])
    reference = clf.fit_head(Method.LINEAR_HEAD, [d.text for d in pool], labels, beta)
    torch.testing.assert_close(under_beta.weight, reference.weight)
