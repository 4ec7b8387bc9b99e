"""Task validation and anchor finding from character offsets."""

from __future__ import annotations

import itertools

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from anchor_cache import Demonstration, TaskSpec, ValidationError
from anchor_cache.prompt import TaskPrompt, _overlapping
from tests.conftest import make_tokenizer, sentiment_task


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _decoded(tokenizer, ids, picks):
    return "".join(tokenizer.decode([ids[i]]) for i in picks)


def test_anchors_are_everything_but_demonstration_texts(tokenizer):
    task = sentiment_task()
    prompt = TaskPrompt.build(task, task.demonstrations, tokenizer)
    ctx = prompt.context
    texts = [_decoded(tokenizer, ctx.ids, t) for t in ctx.text_tokens]
    assert [t.strip() for t in texts] == [d.text for d in task.demonstrations]
    anchors = _decoded(tokenizer, ctx.ids, [i for i, a in enumerate(ctx.anchor) if a])
    assert anchors == "Review:\nSentiment: Positive\nReview:\nSentiment: Negative\nReview:\nSentiment: Positive\n"
    assert ctx.classes == (1, 0, 1)
    assert [ctx.ids[p] for p in ctx.label_positions] == [prompt.label_ids[c] for c in ctx.classes]


def test_demonstration_text_may_contain_the_separator(tokenizer):
    demos = [
        Demonstration(text="line one\nSentiment: Negative\nline three", label="Positive"),
        Demonstration(text="dull", label="Negative"),
    ]
    task = sentiment_task(demonstrations=demos)
    ctx = TaskPrompt.build(task, demos, tokenizer).context
    assert _decoded(tokenizer, ctx.ids, ctx.text_tokens[0]).strip() == demos[0].text
    # The fake "Sentiment: Negative" inside the text is text, not an anchor; the real labels are found.
    assert ctx.classes == (1, 0)
    assert _decoded(tokenizer, ctx.ids, ctx.label_tokens[0]).strip() == "Positive"


def test_text_anchor_context_drops_only_inputs(tokenizer):
    task = sentiment_task()
    prompt = TaskPrompt.build(task, task.demonstrations, tokenizer)
    text = tokenizer.decode(prompt.encode_text_anchor_context())
    assert text == "Review:\nSentiment: Positive\nReview:\nSentiment: Negative\nReview:\nSentiment: Positive\n"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"template": "Review: \nSentiment:"}, "{text} exactly once"),
        ({"template": "{text} {text}"}, "{text} exactly once"),
        ({"labels": ["Positive", "positive"]}, "distinct"),
        ({"labels": ["Positive", " "]}, "non-empty"),
        ({"demonstrations": [Demonstration(text="x", label="Positive")]}, "missing: ['Negative']"),
        ({"demonstrations": [Demonstration(text="x", label="Maybe")]}, "unknown label 'Maybe'"),
        ({"demonstrations": []}, "at least one demonstration"),
        ({"name": "bad name/../"}, "name"),
    ],
)
def test_task_validation_messages(overrides, message):
    with pytest.raises((pydantic.ValidationError, ValidationError), match=None) as info:
        sentiment_task(**overrides)
    assert message in str(info.value)


def test_colliding_label_tokens_are_refused(tokenizer):
    task = sentiment_task(
        labels=["Zq1", "Zq2"],
        demonstrations=[Demonstration(text="a", label="Zq1"), Demonstration(text="b", label="Zq2")],
    )
    with pytest.raises(ValidationError, match="share their first token"):
        TaskPrompt.build(task, task.demonstrations, tokenizer)


def test_template_ending_in_whitespace_is_refused():
    with pytest.raises(pydantic.ValidationError, match="must not end with whitespace"):
        sentiment_task(template="Review: {text}\nSentiment: ")


def test_task_spec_is_frozen():
    task = sentiment_task()
    with pytest.raises(pydantic.ValidationError):
        task.name = "other"
    assert isinstance(task, TaskSpec)


def test_batch_encoding_equals_one_text_at_a_time(tokenizer):
    task = sentiment_task()
    prompt = TaskPrompt.build(task, task.demonstrations, tokenizer)
    texts = ["a wonderful, moving film", "", "dull\nand {text} lifeless", "the quick brown fox " * 20]
    assert prompt.encode_batch(texts) == [prompt.encode(t) for t in texts]
    assert prompt.encode_batch([]) == []


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4)), max_size=40), st.integers(0, 60), st.integers(0, 20))
def test_overlap_search_equals_the_scan_over_every_token(steps, start, width):
    """Offsets in text order (gaps, zero-width and overlapping tokens included): the binary search
    finds exactly the tokens the definition names."""
    offsets, cursor = [], 0
    for gap, length in steps:
        cursor += gap
        offsets.append((cursor, cursor + length))
    ends = list(itertools.accumulate((b for _, b in offsets), max))
    end = start + width
    assert _overlapping(offsets, ends, start, end) == tuple(
        i for i, (a, b) in enumerate(offsets) if a < end and b > start)


@given(st.lists(st.text(max_size=60), min_size=1, max_size=6))
def test_batch_encoding_equals_the_tokenizer_call(tokenizer, texts):
    """The Rust tokenizer's own batch call gives the ids transformers' wrapper gives, text by text."""
    prompt = TaskPrompt.build(sentiment_task(), list(sentiment_task().demonstrations), tokenizer)
    assert prompt.encode_batch(texts) == [prompt.encode(t) for t in texts]
