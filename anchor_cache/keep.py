"""Which context tokens each cache-backed method keeps (paper §3.2)."""

from __future__ import annotations

import numpy as np

from anchor_cache.prompt import EncodedContext


def anchor_keep(context: EncodedContext) -> list[bool]:
    """Hidden_anchor: every formatting and label-word token; only demonstration inputs are dropped."""
    return list(context.anchor)


def random_keep(context: EncodedContext, rng: np.random.Generator) -> list[bool]:
    """Hidden_random: like Hidden_anchor, but each demonstration's label-word tokens are swapped for
    as many random tokens of that demonstration's own text, so the cache size stays the same."""
    keep = list(context.anchor)
    for text, label in zip(context.text_tokens, context.label_tokens, strict=True):
        for i in label:
            keep[i] = False
        count = min(len(label), len(text))
        for i in rng.choice(np.array(text, dtype=int), size=count, replace=False):
            keep[int(i)] = True
    return keep
