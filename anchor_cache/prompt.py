"""Turn a task into token ids and find its anchors from character offsets.

The demonstration context is rendered piece by piece, so the character span of every
demonstration text and label word is known exactly. After tokenising with an offset mapping, a
token is an anchor unless it overlaps a demonstration text: formatting, separators and label words
are anchors. No token-pattern matching, so texts containing the separator or newlines are fine.

Token layout (shared by every method, so they are comparable): ids(context) + ids(query), where
the context is every demonstration followed by the separator and the query is the rendered
template. Vanilla ICL runs that concatenation; Hidden_anchor caches part of ids(context).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

from anchor_cache.errors import ValidationError
from anchor_cache.task import TEXT_SLOT, Demonstration, TaskSpec


@dataclass(frozen=True)
class EncodedContext:
    """The demonstration context as tokens, with per-demonstration bookkeeping."""

    ids: tuple[int, ...]
    anchor: tuple[bool, ...]  # True: formatting or label token; False: demonstration input text
    text_tokens: tuple[tuple[int, ...], ...]  # per demonstration: token indices of its input text
    label_tokens: tuple[tuple[int, ...], ...]  # per demonstration: token indices of its label word
    classes: tuple[int, ...]  # per demonstration: class index

    @property
    def label_positions(self) -> tuple[int, ...]:
        """p_k: the first token of each demonstration's label word."""
        return tuple(tokens[0] for tokens in self.label_tokens)


def _overlapping(offsets: list[tuple[int, int]], ends: list[int], start: int, end: int) -> tuple[int, ...]:
    """Indices of the tokens whose character span meets [start, end). A fast tokenizer's offsets
    run in text order, so a binary search finds the first candidate and the scan stops past `end`:
    the whole context costs O(tokens + spans · log tokens), not tokens × spans."""
    found = []
    for i in range(bisect.bisect_right(ends, start), len(offsets)):
        a, b = offsets[i]
        if a >= end:
            break
        if b > start:
            found.append(i)
    return tuple(found)


@dataclass(frozen=True)
class TaskPrompt:
    """A task bound to a tokenizer: label token ids, the encoded context and query encoding."""

    task: TaskSpec
    demonstrations: tuple[Demonstration, ...]
    tokenizer: PreTrainedTokenizerBase
    label_ids: tuple[int, ...]
    context: EncodedContext

    @classmethod
    def build(
        cls, task: TaskSpec, demonstrations: list[Demonstration], tokenizer: PreTrainedTokenizerBase
    ) -> TaskPrompt:
        if not tokenizer.is_fast:
            raise ValidationError("anchorserve needs a fast (Rust) tokenizer: anchors come from its offsets")
        # Datasets spell labels their own way ('negative'); prompts always show the task's label word.
        demonstrations = [Demonstration(text=d.text, label=task.labels[task.label_index(d.label)])
                          for d in demonstrations]
        label_ids = label_token_ids(task.labels, tokenizer)
        context = encode_context(task, demonstrations, tokenizer)
        for k, (pos, cls_idx) in enumerate(zip(context.label_positions, context.classes, strict=True)):
            if context.ids[pos] != label_ids[cls_idx]:
                raise ValidationError(
                    f"in demonstration {k} the label word {task.labels[cls_idx]!r} does not start with its own "
                    f"token: the end of the template and the label merge into "
                    f"{tokenizer.convert_ids_to_tokens(context.ids[pos])!r}. End the template without "
                    "trailing whitespace (e.g. 'Sentiment:')."
                )
        return cls(task, tuple(demonstrations), tokenizer, label_ids, context)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(self.task.render(text), add_special_tokens=False)["input_ids"]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of every text in one call of the Rust tokenizer itself: the same ids as the
        transformers wrapper (tests/test_prompt.py), at half its cost per request, which is what
        an HTTP frontend spends most on besides HTTP."""
        if not texts:
            return []
        rendered = [self.task.render(t) for t in texts]
        return [e.ids for e in self.tokenizer.backend_tokenizer.encode_batch_fast(rendered, add_special_tokens=False)]

    def encode_within(self, text: str, max_tokens: int, direction: Literal["right", "left"] = "right") -> list[int]:
        """Encode `text`, cutting the end of the text (`right`) or its start (`left`), never the
        template, until it fits `max_tokens`."""
        ids = self.encode(text)
        if len(ids) <= max_tokens:
            return ids
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if direction == "left":
            return self._encode_tail_within(text, offsets, len(ids) - max_tokens, max_tokens)
        keep = max(0, len(offsets) - (len(ids) - max_tokens))
        while True:  # merges at the cut can add a token; shorten until it fits
            ids = self.encode(text[: offsets[keep - 1][1]] if keep > 0 else "")
            if len(ids) <= max_tokens or keep == 0:
                break
            keep -= 1
        if len(ids) > max_tokens:
            raise ValidationError(f"the template alone takes {len(ids)} tokens, more than the limit of {max_tokens}")
        return ids

    def _encode_tail_within(self, text: str, offsets: list[tuple[int, int]], excess: int, max_tokens: int
                            ) -> list[int]:
        """`encode_within` cutting the start: drop the text's first tokens (by their character
        offsets), at least `excess` of them, until the rendered template fits `max_tokens`."""
        drop = min(excess, len(offsets))
        while True:  # merges at the cut can add a token; drop more until it fits
            ids = self.encode(text[offsets[drop][0] :] if drop < len(offsets) else "")
            if len(ids) <= max_tokens or drop == len(offsets):
                break
            drop += 1
        if len(ids) > max_tokens:
            raise ValidationError(f"the template alone takes {len(ids)} tokens, more than the limit of {max_tokens}")
        return ids

    def encode_text_anchor_context(self) -> list[int]:
        """Text_anchor: the demonstration lines without their inputs ("Review:\\nSentiment: Positive")."""
        before, after = self.task.template.split(TEXT_SLOT)
        sep = self.task.separator
        lines = [before.rstrip() + after + " " + d.label for d in self.demonstrations]
        return self.tokenizer(sep.join(lines) + sep, add_special_tokens=False)["input_ids"]


def label_token_ids(labels: list[str], tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The first token of each label word with its leading space; they must all differ."""
    ids = []
    for label in labels:
        tokens = tokenizer(" " + label, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise ValidationError(f"label word {label!r} tokenizes to nothing")
        ids.append(tokens[0])
    seen: dict[int, str] = {}
    for label, token in zip(labels, ids, strict=True):
        if token in seen:
            piece = tokenizer.convert_ids_to_tokens(token)
            raise ValidationError(
                f"label words {seen[token]!r} and {label!r} share their first token {piece!r}; "
                "predictions read only the first token, so pick label words that start differently"
            )
        seen[token] = label
    return tuple(ids)


def encode_context(
    task: TaskSpec, demonstrations: list[Demonstration], tokenizer: PreTrainedTokenizerBase
) -> EncodedContext:
    before, after = task.template.split(TEXT_SLOT)
    pieces: list[str] = []
    text_spans: list[tuple[int, int]] = []
    label_spans: list[tuple[int, int]] = []
    cursor = 0

    def emit(piece: str) -> tuple[int, int]:
        nonlocal cursor
        pieces.append(piece)
        cursor += len(piece)
        return cursor - len(piece), cursor

    for demo in demonstrations:
        emit(before)
        text_spans.append(emit(demo.text))
        emit(after + " ")
        label_spans.append(emit(demo.label))
        emit(task.separator)

    enc = tokenizer("".join(pieces), add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    ends = list(itertools.accumulate((b for _, b in offsets), max))  # nondecreasing, for bisect
    text_tokens = tuple(_overlapping(offsets, ends, *span) for span in text_spans)
    label_tokens = tuple(_overlapping(offsets, ends, *span) for span in label_spans)
    in_text = {i for tokens in text_tokens for i in tokens}
    for k, tokens in enumerate(label_tokens):
        if not tokens or tokens[0] in in_text:
            raise ValidationError(f"demonstration {k}: its label word merges with its text into one token")
    return EncodedContext(
        ids=tuple(enc["input_ids"]),
        anchor=tuple(i not in in_text for i in range(len(offsets))),
        text_tokens=text_tokens,
        label_tokens=label_tokens,
        classes=tuple(task.label_index(d.label) for d in demonstrations),
    )

