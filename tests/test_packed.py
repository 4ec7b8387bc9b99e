"""The packed forward (several tasks' requests in one unpadded sequence) against each row run alone,
on tiny GPT-2 and Llama-GQA (fp32), and its mask pieces against the mask written out by its
definition. Every equivalence has a twin showing that it can fail."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from anchor_cache import AttentionPlan, Classifier, Demonstration, Method, ValidationError
from anchor_cache.forward import Prefix, label_logits, last_hidden
from anchor_cache.packed import PackedBatch, PackedRow, pack, packed_hidden, packed_label_logits
from tests.conftest import QUERIES, sentiment_task

TOPIC_QUERIES = ["the report on the match", "markets", "who wrote the lazy fox report?"]
# a many_shot pool: with the demonstrations, several groups, so its cache carries a key bias of log(1/G)
POOL = [Demonstration(text=t, label=label) for t, label in [
    ("a warm and moving story", "Positive"), ("dull from the start", "Negative"), ("a moving report", "Positive"),
    ("lifeless and a waste", "Negative")]]


def topic_task():
    """Three classes and other demonstrations: another cache length and context_length."""
    return sentiment_task(
        name="topic",
        template="Article: {text}\nAnswer:",
        labels=["World", "Sports", "Business"],
        demonstrations=[
            Demonstration(text="the match ended in a draw", label="Sports"),
            Demonstration(text="markets fell after the report", label="Business"),
            Demonstration(text="the quick brown fox", label="World"),
            Demonstration(text="a draw after the match", label="Sports"),
        ],
    )


def question_task():
    return sentiment_task(
        name="question",
        template="Question: {text}\nAnswer Type:",
        labels=["Person", "World"],
        demonstrations=[Demonstration(text="who wrote hamlet?", label="Person"),
                        Demonstration(text="where is the match?", label="World")],
    )


def _beta(clf: Classifier, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn_like(clf.zero_beta())


def _alone(clf: Classifier, method: Method, ids, beta=None, explicit=False) -> torch.Tensor:
    """(C,) the row run by itself through the padded per-task forward."""
    plan = clf.reweighting_plan(method, beta) if beta is not None else None
    if explicit:
        plan = dataclasses.replace(plan or AttentionPlan(), explicit=True)
    with torch.inference_mode():
        return label_logits(clf.lm, last_hidden(clf.lm, clf.prefix(method), [ids], plan), clf.prompt.label_ids)[0]


@pytest.fixture()
def mixed(tiny_lm):
    return mixed_batch(tiny_lm)


def mixed_batch(tiny_lm):
    """(rows, reference inputs): 3 tasks with 2, 3 and 2 labels; cached, vanilla, text_anchor and
    zero-shot prefixes; rows with a β of their own, one sharing a cache without β."""
    sent, topic, question = (Classifier(tiny_lm, t) for t in (sentiment_task(), topic_task(), question_task()))
    sent_beta, topic_beta = _beta(sent, 1), _beta(topic, 2)
    spec = [
        (sent, Method.HIDDEN_ANCHOR, QUERIES[0], sent_beta),
        (topic, Method.HIDDEN_ANCHOR, TOPIC_QUERIES[0], None),
        (question, Method.ZERO_SHOT, "who wrote it?", None),
        (topic, Method.VANILLA, TOPIC_QUERIES[1], topic_beta),
        (sent, Method.HIDDEN_ANCHOR, QUERIES[2], None),
        (question, Method.HIDDEN_ANCHOR, "who fell?", None),
        (topic, Method.HIDDEN_ANCHOR, TOPIC_QUERIES[2], topic_beta),
        (sent, Method.TEXT_ANCHOR, QUERIES[1], None),
        (sent, Method.HIDDEN_ANCHOR, QUERIES[1], sent_beta),
    ]
    refs = [(clf, method, clf.prompt.encode(text), beta) for clf, method, text, beta in spec]
    rows = [clf.packed_row(ids, method, beta) for clf, method, ids, beta in refs]
    return rows, refs


def _written_out_mask(rows) -> torch.Tensor:
    """(T, S + T) the packed mask by its definition, row by row: the distinct caches' slots in order
    of first use, then the tokens; a token sees its own row's cache slots and its own row's tokens
    up to itself."""
    slots: dict[int, range] = {}
    cached = 0
    for row in rows:
        cache = row.prefix.cache
        if cache is not None and id(cache) not in slots:
            slots[id(cache)] = range(cached, cached + cache.num_tokens)
            cached += cache.num_tokens
    total = sum(row.num_tokens for row in rows)
    mask = torch.zeros(total, cached + total, dtype=torch.bool)
    start = 0
    for row in rows:
        n = row.num_tokens
        if row.prefix.cache is not None:
            own = slots[id(row.prefix.cache)]
            mask[start : start + n, own.start : own.stop] = True
        for j in range(n):
            mask[start + j, cached + start : cached + start + j + 1] = True
        start += n
    return mask


def _assert_spans_follow(batch: PackedBatch, reference: torch.Tensor) -> None:
    """Each span's queries are its tokens in order, and under its mask each of them sees every key
    the reference allows exactly once (a padding repeat masked) and no other key."""
    blocks = batch.blocks
    for i, (start, end) in enumerate(blocks.spans):
        n = end - start
        assert blocks.queries[i, :n].tolist() == list(range(start, end))
        keys = blocks.keys[i][None].expand(n, -1)
        seen = torch.zeros(n, reference.shape[1]).index_put_(
            (torch.arange(n)[:, None].expand_as(keys), keys), blocks.allowed[i, 0, :n].float(), accumulate=True)
        assert torch.equal(seen, reference[start:end].float()), f"span {i} ({start}, {end})"


def _run(lm, rows, block_tokens=None, **changes) -> list[torch.Tensor]:
    """Logits of a hand-modified PackedBatch (for the tests that must fail); a fresh cache each time."""
    batch = dataclasses.replace(pack(lm, rows, block_tokens), **changes)
    plan = AttentionPlan(reweighting=batch.reweighting, targets=batch.targets, blocks=batch.blocks,
                         target_window=batch.target_window, target_entries=batch.target_entries)
    with torch.inference_mode():
        out = lm.model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  position_ids=batch.position_ids, cache=batch.cache,
                                  use_cache=batch.cache is not None, anchor_plan=plan)
        hidden = out.last_hidden_state[0, batch.last]
        return [label_logits(lm, h[None], row.label_ids)[0] for h, row in zip(hidden, rows, strict=True)]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


# --- one task -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [Method.HIDDEN_ANCHOR, Method.VANILLA, Method.TEXT_ANCHOR, Method.ZERO_SHOT])
def test_one_task_packed_equals_padded_and_single(tiny_lm, method):
    clf = Classifier(tiny_lm, sentiment_task())
    queries = clf.encode([*QUERIES, "a", "dull dull dull film"])
    packed = clf.label_logits_ids(queries, method, batch_size=len(queries))
    with torch.inference_mode():
        padded = label_logits(tiny_lm, last_hidden(tiny_lm, clf.prefix(method), queries), clf.prompt.label_ids)
    single = torch.stack([_alone(clf, method, q) for q in queries])
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0, msg=f"{method}: packed vs padded")
    torch.testing.assert_close(packed, single, atol=1e-5, rtol=0, msg=f"{method}: packed vs single")
    chunked = clf.label_logits_ids(queries, method, batch_size=2)  # chunks of 2, in input order
    torch.testing.assert_close(chunked, single, atol=1e-5, rtol=0, msg=f"{method}: chunked vs single")


@pytest.mark.parametrize("method", [Method.HIDDEN_ANCHOR, Method.VANILLA])
def test_one_task_with_beta_packed_equals_padded(tiny_lm, method):
    clf = Classifier(tiny_lm, sentiment_task())
    queries, beta = clf.encode(QUERIES), _beta(clf, 1)
    packed = clf.label_logits_ids(queries, method, batch_size=len(queries), beta=beta)
    single = torch.stack([_alone(clf, method, q, beta) for q in queries])
    torch.testing.assert_close(packed, single, atol=1e-5, rtol=0)
    assert (packed - clf.label_logits_ids(queries, method)).abs().max() > 1e-3  # β matters here
    # hidden_states (evaluation) packs a shared-β plan as well
    plan = clf.reweighting_plan(method, beta)
    with torch.inference_mode():
        hidden = clf.hidden_states(QUERIES, method, batch_size=2, plan=plan)
        padded = last_hidden(tiny_lm, clf.prefix(method), queries, plan)
    torch.testing.assert_close(hidden, padded, atol=1e-5, rtol=0)


def test_one_cache_is_used_without_copying(tiny_lm):
    clf = Classifier(tiny_lm, sentiment_task())
    cache = clf.prefix(Method.HIDDEN_ANCHOR).cache
    before = [t.clone() for t in cache.keys + cache.values]
    rows = [clf.packed_row(q, Method.HIDDEN_ANCHOR) for q in clf.encode(QUERIES)]
    batch = pack(tiny_lm, rows)
    assert all(layer.keys.data_ptr() == k.data_ptr() for layer, k in zip(batch.cache.layers, cache.keys, strict=True))
    assert batch.attention_mask.shape == (1, 1, batch.input_ids.shape[1], cache.num_tokens + batch.input_ids.shape[1])
    for _ in range(3):
        packed_label_logits(tiny_lm, rows)
    for old, new in zip(before, cache.keys + cache.values, strict=True):
        assert torch.equal(old, new)


# --- mixed batches --------------------------------------------------------------------------------------


def test_mixed_batch_equals_each_row_alone(tiny_lm, mixed):
    rows, refs = mixed
    with torch.inference_mode():
        packed = packed_label_logits(tiny_lm, rows)
    assert [len(x) for x in packed] == [len(row.label_ids) for row in rows] == [2, 3, 2, 3, 2, 2, 3, 2, 2]
    for i, (got, ref) in enumerate(zip(packed, refs, strict=True)):
        torch.testing.assert_close(got, _alone(*ref), atol=1e-5, rtol=0, msg=f"row {i}: packed vs alone")
    batch = pack(tiny_lm, rows)
    distinct = {id(r.prefix.cache): r.prefix.cache for r in rows if r.prefix.cache is not None}
    assert batch.cache.layers[0].keys.shape[2] == sum(c.num_tokens for c in distinct.values())  # each cache once
    assert len({c.context_length for c in distinct.values()}) == 3


def test_mixed_batch_tests_can_fail(tiny_lm, mixed):
    """Off-by-one positions, a mask letting rows see each other, or a dropped mask: all visible."""
    rows, refs = mixed
    alone = [_alone(*ref) for ref in refs]
    batch = pack(tiny_lm, rows)
    torch.testing.assert_close(torch.cat(_run(tiny_lm, rows)), torch.cat(alone), atol=1e-5, rtol=0)
    assert _max_diff(_run(tiny_lm, rows, position_ids=batch.position_ids + 1), alone) > 1e-3
    tokens, total = batch.input_ids.shape[1], batch.attention_mask.shape[-1]
    causal = torch.arange(total)[None, :] <= torch.arange(tokens)[:, None] + (total - tokens)
    assert _max_diff(_run(tiny_lm, rows, attention_mask=causal[None, None]), alone) > 1e-3  # rows see each other
    wrong_slot = batch.attention_mask.clone()
    wrong_slot[..., 0] = ~wrong_slot[..., 0]  # one cache slot seen by the wrong rows
    assert _max_diff(_run(tiny_lm, rows, attention_mask=wrong_slot), alone) > 1e-4


def test_blocked_batch_tests_can_fail(tiny_lm, mixed):
    """With spans the spans' masks decide: a span seeing all its keys, or one cache key seen by the
    wrong rows, is visible; the (placeholder) attention_mask is not read at all."""
    rows, refs = mixed
    alone = [_alone(*ref) for ref in refs]
    blocks = pack(tiny_lm, rows, 16).blocks
    assert len(blocks.spans) > 2
    # were the model's mask read, this one would let every row see every other
    see_all = torch.ones(1, 1, 1, 1, dtype=torch.bool).expand(pack(tiny_lm, rows, None).attention_mask.shape)
    torch.testing.assert_close(torch.cat(_run(tiny_lm, rows, 16, attention_mask=see_all)), torch.cat(alone),
                               atol=1e-5, rtol=0)
    open_spans = dataclasses.replace(blocks, allowed=torch.ones_like(blocks.allowed))
    assert _max_diff(_run(tiny_lm, rows, 16, blocks=open_spans), alone) > 1e-3
    wrong = blocks.allowed.clone()
    wrong[..., 0] = ~wrong[..., 0]  # each span's first cache key
    assert _max_diff(_run(tiny_lm, rows, 16, blocks=dataclasses.replace(blocks, allowed=wrong)), alone) > 1e-4


def test_a_target_sees_its_whole_row_through_the_window(tiny_lm, mixed):
    """With spans and β, each target's softmax is taken over the cache and a window of the longest
    row's tokens, not over the whole sequence: the row-alone result needs all of it, and a window
    half as wide changes the re-weighted rows."""
    rows, refs = mixed
    chosen = [i for i, row in enumerate(rows) if row.reweighting is not None and row.prefix.cache is not None]
    weighted, alone = [rows[i] for i in chosen], [_alone(*refs[i]) for i in chosen]
    batch = pack(tiny_lm, weighted, 16)
    assert len(batch.blocks.spans) > 1 and batch.target_window == max(row.num_tokens for row in weighted)
    assert pack(tiny_lm, [dataclasses.replace(r, reweighting=None) for r in weighted], 16).target_window is None
    torch.testing.assert_close(torch.cat(_run(tiny_lm, weighted, 16)), torch.cat(alone), atol=1e-5, rtol=0)
    assert _max_diff(_run(tiny_lm, weighted, 16, target_window=batch.target_window // 2), alone) > 1e-4


@pytest.mark.parametrize("block_tokens", [None, 1, 16, 64])
def test_mask_pieces_equal_the_written_out_mask(tiny_lm, mixed, block_tokens):
    """The dense mask, each span's mask and the targets' rows, all computed from the segments, are
    the pieces of the mask written out by its definition."""
    rows, _ = mixed
    reference = _written_out_mask(rows)
    batch = pack(tiny_lm, rows, block_tokens)
    assert batch.attention_mask.shape == (1, 1, *reference.shape)
    if batch.blocks is None:
        assert torch.equal(batch.attention_mask[0, 0], reference)
        return
    assert len(batch.blocks.spans) > 1
    _assert_spans_follow(batch, reference)
    plan = AttentionPlan(blocks=batch.blocks, targets=batch.last[None])
    assert torch.equal(plan.target_mask[0], reference[batch.last])
    segments = batch.blocks.segments
    queries, keys = torch.randperm(reference.shape[0])[:7], torch.randperm(reference.shape[1])[:11]
    assert torch.equal(segments.allowed(queries, keys), reference[queries][:, keys])
    with pytest.raises(ValueError, match="dense"):  # the written-out path reads the dense mask
        AttentionPlan(blocks=batch.blocks, explicit=True)


@pytest.mark.parametrize("block_tokens", [None, 1, 16, "auto"])
def test_blocked_sdpa_equals_one_call(tiny_lm, mixed, block_tokens):
    """Spans of whole rows (SDPA per span, CPU) = one masked SDPA call = each row alone; the spans
    keep the promise the fast path relies on: no query sees a key outside the cache and its span."""
    rows, refs = mixed
    batch = pack(tiny_lm, rows, block_tokens)
    if block_tokens in (1, 16):
        assert batch.blocks is not None and len(batch.blocks.spans) > 2
    spans = batch.blocks.spans if batch.blocks is not None else ((0, batch.input_ids.shape[1]),)
    assert spans[0][0] == 0 and spans[-1][1] == batch.input_ids.shape[1]
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    row_ends = set((batch.last + 1).tolist())
    assert all(end in row_ends for _, end in spans)
    if batch.blocks is not None:
        _assert_spans_follow(batch, _written_out_mask(rows))
    with torch.inference_mode():
        packed = packed_label_logits(tiny_lm, rows, block_tokens=block_tokens)
    for i, (got, ref) in enumerate(zip(packed, refs, strict=True)):
        torch.testing.assert_close(got, _alone(*ref), atol=1e-5, rtol=0, msg=f"row {i}, spans {block_tokens}")


def test_the_4d_mask_reaches_the_attention_function(tiny_lm, mixed):
    """The mask trap: transformers must pass our 4-D mask through unchanged. Were it dropped or
    rebuilt, the attention function would see plain causal attention across rows."""
    rows, _ = mixed
    batch = pack(tiny_lm, rows, None)
    mask = batch.attention_mask[0, 0]
    assert not mask.all(-1).any() and (~mask).any()
    with torch.inference_mode():
        out = tiny_lm.model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                       position_ids=batch.position_ids, cache=batch.cache, use_cache=True,
                                       output_attentions=True, anchor_plan=AttentionPlan(record_weights=True))
    for layer, weights in enumerate(out.attentions):  # explicit path: (1, Hq, T, S + T)
        assert weights[0][:, ~mask].abs().max() == 0, f"layer {layer} attends across rows"
        assert (weights[0] > 0).any(0).sum() > 0.5 * mask.sum(), f"layer {layer}: allowed slots carry weight"
    # the fast path's target rows see the same mask, from the dense mask or, with spans, the segments
    for block_tokens in (None, 16):
        batch = pack(tiny_lm, rows, block_tokens)
        plan = AttentionPlan(capture_target_weights=True, targets=batch.last[None], blocks=batch.blocks)
        with torch.inference_mode():
            tiny_lm.model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                     position_ids=batch.position_ids, cache=batch.cache, use_cache=True,
                                     anchor_plan=plan)
        for weights in plan.capture.target_weights.values():  # (B, Hq, S + T)
            assert weights.sum(1)[~mask[batch.last]].abs().max() == 0
            assert (weights.sum(1)[mask[batch.last]] > 0).float().mean() > 0.5
            torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:2]))


def test_a_large_batch_with_spans_equals_one_call_and_each_row_alone(tiny_lm):
    """Enough rows for many spans, four tasks (one a many-shot cache with its key bias), every
    prefix kind, rows with and without β: spans = one masked call = each row alone, and no
    T × (S + T) mask is kept."""
    sent, topic, question = (Classifier(tiny_lm, t) for t in (sentiment_task(), topic_task(), question_task()))
    many = Classifier(tiny_lm, sentiment_task(name="many", examples=POOL, method=Method.MANY_SHOT))
    assert many.prefix(Method.MANY_SHOT).cache.key_bias is not None
    betas = {id(clf): _beta(clf, seed) for seed, clf in enumerate((sent, topic, question), 1)}
    betas[id(many)] = torch.randn_like(many.zero_beta())
    kinds = [(sent, Method.HIDDEN_ANCHOR), (topic, Method.HIDDEN_ANCHOR), (many, Method.MANY_SHOT),
             (question, Method.HIDDEN_ANCHOR), (topic, Method.VANILLA), (sent, Method.ZERO_SHOT),
             (question, Method.TEXT_ANCHOR)]
    texts = [*QUERIES, *TOPIC_QUERIES, "who wrote it?", "a dull report on the markets"]
    spec = [(*kinds[i % len(kinds)], texts[i % len(texts)], i % 3 != 0) for i in range(48)]
    weighted_methods = (Method.HIDDEN_ANCHOR, Method.VANILLA, Method.MANY_SHOT)  # those with label keys
    refs = [(clf, method, clf.prompt.encode(text), betas[id(clf)] if weighted and method in weighted_methods else None)
            for clf, method, text, weighted in spec]
    results = []
    for with_beta in (True, False):
        cases = [ref if with_beta else (*ref[:3], None) for ref in refs]
        rows = [clf.packed_row(ids, method, beta) for clf, method, ids, beta in cases]
        batch = pack(tiny_lm, rows, 64)
        total = batch.input_ids.shape[1]
        assert len(batch.blocks.spans) > 8 and len({id(r.prefix.cache) for r in rows}) == 5  # 4 caches and none
        assert batch.attention_mask.untyped_storage().nbytes() < total
        _assert_spans_follow(batch, _written_out_mask(rows))
        with torch.inference_mode():
            one_call = packed_label_logits(tiny_lm, rows, block_tokens=None)
            for block_tokens in (64, 16):
                spans = packed_label_logits(tiny_lm, rows, block_tokens=block_tokens)
                torch.testing.assert_close(torch.cat(spans), torch.cat(one_call), atol=1e-5, rtol=0,
                                           msg=f"spans of {block_tokens} vs one call, beta={with_beta}")
        for i, (got, ref) in enumerate(zip(one_call, cases, strict=True)):
            torch.testing.assert_close(got, _alone(*ref), atol=1e-5, rtol=1e-4, msg=f"row {i}, beta={with_beta}")
        results.append(one_call)
    assert _max_diff(*results) > 1e-3  # β matters here


def test_zero_beta_changes_nothing(tiny_lm, mixed):
    rows, _ = mixed
    zero = [dataclasses.replace(r, reweighting=dataclasses.replace(r.reweighting, beta=torch.zeros_like(
        r.reweighting.beta))) if r.reweighting is not None else r for r in rows]
    plain = [dataclasses.replace(r, reweighting=None) for r in rows]
    with torch.inference_mode():
        zero_out, plain_out, beta_out = (packed_label_logits(tiny_lm, x) for x in (zero, plain, rows))
    assert _max_diff(zero_out, plain_out) < 1e-6
    assert _max_diff(beta_out, plain_out) > 1e-3  # the test can fail


def test_packed_fast_path_with_beta_equals_the_explicit_formula(tiny_lm, mixed):
    rows, refs = mixed
    with torch.inference_mode():
        fast = packed_label_logits(tiny_lm, rows)
        explicit = packed_label_logits(tiny_lm, rows, explicit=True)
    for i, (f, e, ref) in enumerate(zip(fast, explicit, refs, strict=True)):
        torch.testing.assert_close(f, e, atol=1e-5, rtol=0, msg=f"row {i}: packed fast vs packed explicit")
        torch.testing.assert_close(e, _alone(*ref, explicit=True), atol=1e-5, rtol=0,
                                   msg=f"row {i}: packed explicit vs per-row explicit")


def test_a_row_does_not_depend_on_its_batch(tiny_lm, mixed):
    rows, _ = mixed
    with torch.inference_mode():
        full = packed_label_logits(tiny_lm, rows)
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
        permuted = packed_label_logits(tiny_lm, [rows[i] for i in order])
        for i, j in enumerate(order):
            torch.testing.assert_close(permuted[i], full[j], atol=1e-5, rtol=0, msg=f"row {j} moved to {i}")
        for i in range(len(rows)):  # alone and in a pair with a neighbour
            torch.testing.assert_close(packed_label_logits(tiny_lm, [rows[i]])[0], full[i], atol=1e-5, rtol=0)
            pair = packed_label_logits(tiny_lm, [rows[i - 1], rows[i]])
            torch.testing.assert_close(pair[1], full[i], atol=1e-5, rtol=0)


# --- validation -----------------------------------------------------------------------------------------


def test_packed_rows_are_validated(tiny_lm):
    clf = Classifier(tiny_lm, sentiment_task())
    with pytest.raises(ValidationError, match="label words"):
        clf.packed_row([1, 2], Method.ZERO_SHOT, clf.zero_beta())
    with pytest.raises(ValidationError, match="shape"):
        clf.packed_row([1, 2], Method.HIDDEN_ANCHOR, torch.zeros(1, 1, 1))
    with pytest.raises(ValidationError, match="empty"):
        packed_label_logits(tiny_lm, [clf.packed_row([1], Method.ZERO_SHOT), PackedRow(Prefix(), (), (1, 2))])
    too_long = [1] * (tiny_lm.max_positions - clf.prefix(Method.HIDDEN_ANCHOR).first_position + 1)
    with pytest.raises(ValidationError, match="positions"):
        packed_label_logits(tiny_lm, [clf.packed_row(too_long, Method.HIDDEN_ANCHOR)])
    assert packed_label_logits(tiny_lm, []) == []
    assert clf.label_logits_ids([], Method.HIDDEN_ANCHOR).shape == (0, 2)
    with torch.inference_mode():
        assert packed_hidden(tiny_lm, [clf.packed_row([1], Method.ZERO_SHOT)]).shape == (1, 32)
