"""End to end on the real default model, SmolLM2-135M-Instruct (converted from its GGUF once)."""

from __future__ import annotations

import pytest
import torch

from anchor_cache import Classifier, Method
from anchor_cache.cache import build_anchor_cache
from anchor_cache.forward import Prefix, label_logits, last_hidden
from server.settings import builtin_task

pytestmark = pytest.mark.slow

TASK = builtin_task()  # the task `make serve` serves


def test_obvious_sentiment_is_classified(real_lm):
    """SmolLM2-135M leans to 'Positive' under ICL (see docs/RESULTS.md), so the negative case is blunt."""
    clf = Classifier(real_lm, TASK)
    texts = ["a wonderful film", "dreadful"]
    for method in (Method.HIDDEN_ANCHOR, Method.VANILLA):
        assert [p.label for p in clf.classify(texts, method)] == ["Positive", "Negative"], method


def test_real_model_keep_all_cache_matches_vanilla(real_lm):
    clf = Classifier(real_lm, TASK)
    ctx = clf.prompt.context
    cache = build_anchor_cache(real_lm, ctx.ids, [True] * len(ctx.ids), ctx.label_positions, ctx.classes)
    query = clf.prompt.encode("a warm film")
    with torch.inference_mode():
        cached = label_logits(real_lm, last_hidden(real_lm, Prefix(cache=cache), [query]), clf.prompt.label_ids)
    torch.testing.assert_close(cached, clf.label_logits(["a warm film"], Method.VANILLA), atol=1e-3, rtol=0)


def test_smollm2_shape_is_grouped_query(real_lm):
    cfg = real_lm.model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (9, 3, 30)
