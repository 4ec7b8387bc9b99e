"""Heads on anchor-context features and many-shot anchors (issue 13): exact against their
references, and wired into the eval's methods."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from anchor_cache import Classifier, Demonstration, Method
from anchor_cache.cache import merge_anchor_caches
from anchor_cache.errors import ValidationError
from anchor_cache.evaluate import EvalConfig, evaluate
from anchor_cache.heads import LINEAR_C, fit_knn_head, fit_linear_head
from anchor_cache.many_shot import groups_of, many_shot_cache
from tests.conftest import QUERIES, sentiment_task


def blobs(n_classes: int, per_class: int = 12, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (n_classes, dim))
    x = np.concatenate([centres[c] + rng.normal(0, 1, (per_class, dim)) for c in range(n_classes)])
    return torch.tensor(x, dtype=torch.float32), np.repeat(np.arange(n_classes), per_class)


@pytest.mark.parametrize("n_classes", [2, 3, 14])
def test_linear_head_is_the_fitted_pipeline_folded_into_one_matmul(n_classes):
    x, y = blobs(n_classes)
    head = fit_linear_head(x, y, n_classes)
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=LINEAR_C, max_iter=5000)).fit(x.numpy(), y)
    queries, _ = blobs(n_classes, per_class=5, seed=1)
    scores = head.scores(queries)
    assert scores.shape == (len(queries), n_classes) and head.weight.shape == (n_classes, x.shape[1])
    assert np.array_equal(scores.argmax(-1).numpy(), reference.predict(queries.numpy()))
    expected = reference.predict_proba(queries.numpy())
    np.testing.assert_allclose(torch.softmax(scores.double(), -1).numpy(), expected, atol=1e-4)


def test_knn_head_votes_among_the_nearest_rows():
    keys = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 1.0]])
    head = fit_knn_head(keys, np.array([0, 0, 1, 1, 1]), 2, k=2)
    assert head.scores(torch.tensor([[1.0, 0.05], [0.05, 1.0]])).argmax(-1).tolist() == [0, 1]
    # votes are weighted by similarity: two close rows outvote three far ones
    assert fit_knn_head(keys, np.array([0, 0, 1, 1, 1]), 2, k=5).scores(torch.tensor([[1.0, 0.0]])).argmax() == 0


def test_a_head_needs_every_class_in_its_pool():
    x, y = blobs(3)
    with pytest.raises(ValidationError, match=r"classes \[2\]"):
        fit_linear_head(x[y < 2], y[y < 2], 3)
    with pytest.raises(ValidationError, match=r"classes \[2\]"):
        fit_knn_head(x[y < 2], y[y < 2], 3)


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
    assert not torch.allclose(merged.label_logits(QUERIES, Method.HIDDEN_ANCHOR), expected)


def test_eval_runs_the_pool_methods_with_disjoint_pools(tiny_lm, dataset_dir):
    cfg = EvalConfig(data=dataset_dir, template="Review: {text}\nSentiment:", labels=["Negative", "Positive"],
                     methods=["linear_head", "knn", "many_shot"], seeds=[1, 2], limit=4, pool_per_class=2)
    result = evaluate(tiny_lm, cfg, progress=False)
    assert set(result["methods"]) == {"vanilla", "linear_head", "knn", "many_shot"}
    anchor_bytes = result["methods"]["many_shot"]["kv_cache_bytes"]
    assert result["methods"]["linear_head"]["kv_cache_bytes"] < anchor_bytes  # a head, not a second cache
    assert all(len(m["per_seed"]) == 2 for m in result["methods"].values())
