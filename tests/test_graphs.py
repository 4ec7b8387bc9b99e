"""The static-shape packed forward that CUDA graphs capture (anchor_cache/graphs.py), run eagerly on
the CPU: padded to its shape, it must give each row what the row gives alone, through the dense
mask and through fixed spans, with β, key biases and several caches. The twins show that the
padding is inert only because it is masked."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from anchor_cache import Classifier, Method
from anchor_cache.graphs import GRID_STEPS, PackedGraphs, Shape, round_up
from anchor_cache.packed import Layout, packed_label_logits
from tests.conftest import QUERIES, sentiment_task
from tests.test_packed import POOL, _alone, _beta, mixed_batch, topic_task


def test_round_up_is_a_grid_with_bounded_padding():
    sizes = [round_up(n, 64) for n in range(1, 20000)]
    assert sizes[:64] == [64] * 64
    assert all(a <= b for a, b in itertools.pairwise(sizes))  # monotone
    assert all(n <= s <= n * (1 + 1 / GRID_STEPS) + 1 for n, s in zip(range(64, 20000), sizes[63:], strict=True))
    assert len(set(sizes)) <= GRID_STEPS * (math.log2(20000 / 64) + 1)  # few shapes: GRID_STEPS per octave
    assert round_up(7681, 64) == 8192 and round_up(5000, 64) == 5120


@pytest.fixture()
def mixed(tiny_lm):
    return mixed_batch(tiny_lm)


def _logits(lm, rows, graphs: PackedGraphs | None) -> list[torch.Tensor]:
    with torch.inference_mode():
        return packed_label_logits(lm, rows, graphs=graphs)


def _check_alone(lm, rows, refs, graphs: PackedGraphs) -> None:
    for i, (got, ref) in enumerate(zip(_logits(lm, rows, graphs), refs, strict=True)):
        torch.testing.assert_close(got, _alone(*ref), atol=1e-5, rtol=0, msg=f"row {i}: static shape vs alone")


def test_mixed_batch_in_spans_equals_each_row_alone(tiny_lm, mixed):
    rows, refs = mixed
    graphs = PackedGraphs(tiny_lm)
    _check_alone(tiny_lm, rows, refs, graphs)
    (forward,) = graphs._forwards.values()
    shape = forward.shape
    assert shape.span < shape.tokens, "several spans"
    assert shape.slots > Layout.of(tiny_lm, rows).num_slots, "padding slots"
    assert shape.targets and shape.tokens > sum(row.num_tokens for row in rows)
    assert graphs.captured == 0  # no CUDA here: the static forward ran eagerly


def test_one_short_row_is_one_span(tiny_lm):
    clf = Classifier(tiny_lm, sentiment_task())
    beta = _beta(clf, 3)
    ids = clf.prompt.encode(QUERIES[0])
    graphs = PackedGraphs(tiny_lm)
    _check_alone(tiny_lm, [clf.packed_row(ids, Method.HIDDEN_ANCHOR, beta)],
                 [(clf, Method.HIDDEN_ANCHOR, ids, beta)], graphs)
    (forward,) = graphs._forwards.values()
    assert forward.shape.span == forward.shape.tokens


def test_a_shape_is_reused_with_other_rows_and_caches(tiny_lm, mixed):
    """Buffers are rewritten per batch: a second batch of the same shape over other caches must not
    read the first one's K/V, β or indices."""
    rows, refs = mixed
    graphs = PackedGraphs(tiny_lm)
    _check_alone(tiny_lm, rows, refs, graphs)
    reordered = list(zip(rows, refs, strict=True))[::-1]
    _check_alone(tiny_lm, [r for r, _ in reordered], [ref for _, ref in reordered], graphs)
    assert len(graphs._forwards) == 1


def test_key_bias_and_many_caches(tiny_lm):
    many = Classifier(tiny_lm, sentiment_task(name="many", examples=POOL, method=Method.MANY_SHOT))
    topic = Classifier(tiny_lm, topic_task())
    beta = _beta(many, 4)
    refs = [(many, Method.MANY_SHOT, many.prompt.encode(q), beta if i % 2 else None) for i, q in enumerate(QUERIES)]
    refs += [(topic, Method.HIDDEN_ANCHOR, topic.prompt.encode(q), None) for q in QUERIES]
    rows = [clf.packed_row(ids, method, b) for clf, method, ids, b in refs]
    graphs = PackedGraphs(tiny_lm)
    _check_alone(tiny_lm, rows, refs, graphs)
    assert next(iter(graphs._forwards.values())).shape.key_bias


def test_padding_slots_are_inert_only_because_no_token_has_their_cache(tiny_lm, mixed, monkeypatch):
    rows, refs = mixed
    monkeypatch.setattr("anchor_cache.graphs.NO_CACHE", 0)  # padding slots now belong to the first cache
    got = _logits(tiny_lm, rows, PackedGraphs(tiny_lm))
    first = rows[0].prefix.cache
    wrong = [i for i, (g, ref) in enumerate(zip(got, refs, strict=True))
             if not torch.allclose(g, _alone(*ref), atol=1e-5, rtol=0)]
    assert wrong and all(rows[i].prefix.cache is first for i in wrong)


def test_rows_without_a_static_shape_run_eagerly(tiny_lm, monkeypatch):
    clf = Classifier(tiny_lm, sentiment_task())
    long = clf.prompt.encode(" ".join(["dull"] * 40))
    refs = [(clf, Method.VANILLA, long, None), (clf, Method.HIDDEN_ANCHOR, clf.prompt.encode("dull"), None)]
    rows = [clf.packed_row(ids, method) for _, method, ids, _ in refs]
    monkeypatch.setattr("anchor_cache.graphs.MAX_SPAN", 32)
    assert Shape.of(Layout.of(tiny_lm, rows), rows) is None
    graphs = PackedGraphs(tiny_lm)
    _check_alone(tiny_lm, rows, refs, graphs)
    assert not graphs._forwards


def test_pool_heads_are_left_to_the_eager_forward(tiny_lm):
    clf = Classifier(tiny_lm, sentiment_task(examples=POOL))
    head_rows = [r for r in (clf.packed_row(clf.prompt.encode(q), Method.LINEAR_HEAD) for q in QUERIES)]
    if head_rows[0].head is None:
        pytest.skip("no head for this pool")
    assert PackedGraphs(tiny_lm).last_hidden(head_rows) is None
