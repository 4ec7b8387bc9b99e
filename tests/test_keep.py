"""Control methods (paper Table 2) and the paper's seeded sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest

from anchor_cache import Classifier, Demonstration, Method, ValidationError
from anchor_cache.data import Example, read_jsonl, sample_demonstrations, sample_rows
from anchor_cache.keep import anchor_keep, random_keep
from anchor_cache.task import POOL_METHODS
from tests.conftest import QUERIES, sentiment_task


def test_hidden_random_swaps_label_words_for_text_tokens(tiny_lm):
    ctx = Classifier(tiny_lm, sentiment_task()).prompt.context
    keep = random_keep(ctx, np.random.default_rng(0))
    assert sum(keep) == sum(anchor_keep(ctx))
    for text, label in zip(ctx.text_tokens, ctx.label_tokens, strict=True):
        assert not any(keep[i] for i in label)
        assert sum(keep[i] for i in text) == len(label)
    assert keep == random_keep(ctx, np.random.default_rng(0))


def test_every_method_returns_distributions(tiny_lm):
    pool = [Demonstration(text=t, label=label) for t, label in [("a warm story", "Positive"), ("dull", "Negative")]]
    clf = Classifier(tiny_lm, sentiment_task(examples=pool), dev_texts=QUERIES, random_top_draws=3)
    for method in Method:
        preds = clf.classify(QUERIES, method)
        assert [p.label in ("Negative", "Positive") for p in preds] == [True] * len(QUERIES)
        for p in preds:
            assert math.isclose(sum(p.probs.values()), 1.0, rel_tol=1e-5)
            assert p.logprobs[p.label] == max(p.logprobs.values())


def test_pool_methods_need_a_pool(tiny_lm):
    clf = Classifier(tiny_lm, sentiment_task())
    for method in POOL_METHODS:
        with pytest.raises(ValidationError, match="labelled pool"):
            clf.classify(QUERIES, method)


def test_random_top_needs_dev_texts(tiny_lm):
    with pytest.raises(ValidationError, match="dev texts"):
        Classifier(tiny_lm, sentiment_task()).classify(QUERIES, Method.HIDDEN_RANDOM_TOP)


def test_cache_is_much_smaller_than_the_context(tiny_lm):
    clf = Classifier(tiny_lm, sentiment_task())
    assert clf.prefix(Method.HIDDEN_ANCHOR).cache.num_tokens < len(clf.prompt.context.ids)


def test_empty_query_text_still_classifies(tiny_lm):
    assert Classifier(tiny_lm, sentiment_task()).classify([""])[0].label in ("Negative", "Positive")


def test_too_long_input_is_a_validation_error(tiny_lm):
    with pytest.raises(ValidationError, match="positions"):
        Classifier(tiny_lm, sentiment_task()).classify(["word " * 2000])


def test_demonstrations_follow_the_seeded_shuffle():
    rows = [Example(text=str(i), label=i % 3) for i in range(30)]
    demos, used = sample_demonstrations(rows, 3, 2, seed=42)
    assert sorted(r.label for r in demos) == [0, 0, 1, 1, 2, 2]
    order = [int(i) for i in np.random.default_rng(42).permutation(30)]
    assert [int(r.text) for r in demos] == [i for i in order if i in used]
    assert demos == sample_demonstrations(rows, 3, 2, seed=42)[0]
    test = sample_rows(rows, 5, seed=42)
    assert [int(r.text) for r in test] == order[:5]
    assert not {r.text for r in sample_rows(rows, 30, 1, exclude=used)} & {r.text for r in demos}


def test_bad_dataset_rows_are_reported(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "ok", "label": "positive"}\n{"text": "no label"}\n')
    with pytest.raises(ValidationError, match=r"train\.jsonl:2"):
        read_jsonl(path, ["Negative", "Positive"])
    with pytest.raises(ValidationError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl", ["Negative", "Positive"])
