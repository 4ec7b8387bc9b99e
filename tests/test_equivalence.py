"""Exact equivalences on tiny GPT-2 and Llama models (fp32)."""

from __future__ import annotations

import torch

from anchor_cache import AttentionPlan, Classifier, Method
from anchor_cache.cache import build_anchor_cache
from anchor_cache.forward import Prefix, label_logits, last_hidden
from tests.conftest import QUERIES, sentiment_task


def _logits(clf: Classifier, prefix: Prefix, queries=QUERIES, plan=None) -> torch.Tensor:
    encoded = [clf.prompt.encode(q) for q in queries]
    with torch.inference_mode():
        return torch.cat([label_logits(clf.lm, last_hidden(clf.lm, prefix, [q], plan), clf.prompt.label_ids)
                          for q in encoded])


def test_keeping_every_token_reproduces_vanilla(tiny_lm):
    clf = Classifier(tiny_lm, sentiment_task())
    ctx = clf.prompt.context
    keep_all = build_anchor_cache(tiny_lm, ctx.ids, [True] * len(ctx.ids), ctx.label_positions, ctx.classes)
    vanilla = clf.label_logits(QUERIES, Method.VANILLA)
    cached = _logits(clf, Prefix(cache=keep_all))
    torch.testing.assert_close(cached, vanilla, atol=1e-4, rtol=0)
    # The test can fail: dropping the demonstration texts does change the logits.
    anchors_only = clf.label_logits(QUERIES, Method.HIDDEN_ANCHOR)
    assert (anchors_only - vanilla).abs().max() > 1e-3


def test_batches_match_single_queries(tiny_lm):
    """Serving (packed, one forward per batch) and the padded per-task forward (analyses, β training)
    both equal one query at a time; mixed-task packing is in test_packed.py."""
    clf = Classifier(tiny_lm, sentiment_task())
    encoded = clf.encode(QUERIES)
    for method in (Method.VANILLA, Method.HIDDEN_ANCHOR, Method.TEXT_ANCHOR, Method.ZERO_SHOT):
        single = _logits(clf, clf.prefix(method))
        packed = clf.label_logits(QUERIES, method, batch_size=len(QUERIES))
        torch.testing.assert_close(packed, single, atol=1e-5, rtol=0, msg=f"{method}: packed vs single")
        with torch.inference_mode():
            hidden = last_hidden(tiny_lm, clf.prefix(method), encoded)
        padded = label_logits(tiny_lm, hidden, clf.prompt.label_ids)
        torch.testing.assert_close(padded, single, atol=1e-5, rtol=0, msg=f"{method}: padded vs single")


def test_explicit_attention_matches_sdpa(tiny_lm):
    """The written-out reference path (used whenever a plan intervenes) equals the fast SDPA path."""
    clf = Classifier(tiny_lm, sentiment_task())
    for method in (Method.VANILLA, Method.HIDDEN_ANCHOR):
        prefix = clf.prefix(method)
        fast = _logits(clf, prefix)
        explicit = _logits(clf, prefix, plan=AttentionPlan(record_weights=True))
        torch.testing.assert_close(explicit, fast, atol=1e-5, rtol=0, msg=f"{method}: explicit vs sdpa")


def test_recorded_weights_are_causal_distributions(tiny_lm):
    clf = Classifier(tiny_lm, sentiment_task())
    ids = torch.tensor([list(clf.prompt.context.ids)])
    with torch.inference_mode():
        out = tiny_lm.model.base_model(input_ids=ids, output_attentions=True, anchor_plan=AttentionPlan(True))
    assert len(out.attentions) == tiny_lm.model.config.num_hidden_layers
    weights = out.attentions[0][0]  # (Hq, T, T): per query head, after GQA repeat
    assert weights.shape[0] == tiny_lm.model.config.num_attention_heads
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:2]))
    assert torch.triu(weights, diagonal=1).abs().max() == 0


def test_anchor_cache_is_shared_and_never_written(tiny_lm):
    clf = Classifier(tiny_lm, sentiment_task())
    cache = clf.prefix(Method.HIDDEN_ANCHOR).cache
    before = [t.clone() for t in cache.keys + cache.values]
    pointers = [t.data_ptr() for t in cache.keys + cache.values]
    dynamic = cache.as_dynamic_cache(4, tiny_lm.model.config)
    assert all(layer.keys.data_ptr() == k.data_ptr() for layer, k in zip(dynamic.layers, cache.keys, strict=True))
    for _ in range(20):
        clf.classify(QUERIES * 3, Method.HIDDEN_ANCHOR, batch_size=4)
    after = cache.keys + cache.values
    assert [t.data_ptr() for t in after] == pointers
    for old, new in zip(before, after, strict=True):
        assert torch.equal(old, new)


def test_queries_keep_their_full_prompt_positions(tiny_lm):
    """Hidden_anchor starts the query at the full context length, not at the number of kept tokens."""
    clf = Classifier(tiny_lm, sentiment_task())
    prefix = clf.prefix(Method.HIDDEN_ANCHOR)
    assert prefix.first_position == len(clf.prompt.context.ids) > prefix.cache.num_tokens
