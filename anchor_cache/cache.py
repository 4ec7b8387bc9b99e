"""AnchorCache: per-layer keys and values of the kept demonstration-context tokens.

Built once from one forward over the whole context, so each kept token's K/V already carries
what it gathered from the dropped demonstration text in every layer (paper §3.2, issue #23 of the
reference repo). RoPE keys are stored rotated at their original positions and GPT-2 states include
their learned position embedding, so the query just continues at `context_length`.

The tensors are shared by every request and never written: each forward gets a fresh
DynamicCache whose layers point at batch-expanded views (no copy) of these tensors, or, for a
packed forward over several tasks, at their concatenation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache, PretrainedConfig

from anchor_cache.attention import AttentionPlan
from anchor_cache.models import LoadedModel


@dataclass(frozen=True, eq=False)
class AnchorCache:
    keys: tuple[torch.Tensor, ...]  # per layer (1, H_kv, M, D)
    values: tuple[torch.Tensor, ...]  # per layer (1, H_kv, M, D)
    positions: tuple[int, ...]  # original context position of each kept token
    context_length: int  # tokens in the full context: the query's first position
    label_slots: tuple[int, ...]  # index into the kept tokens of each kept label word
    label_classes: tuple[int, ...]  # class of each kept label word
    key_bias: torch.Tensor | None = None  # (M,) float32 logit every query adds for each kept token; None: 0

    @property
    def num_tokens(self) -> int:
        return len(self.positions)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def as_dynamic_cache(self, batch_size: int, config: PretrainedConfig) -> DynamicCache:
        """A fresh cache for one forward; layers hold expanded views, so nothing is copied here."""
        return dynamic_cache([k.expand(batch_size, -1, -1, -1) for k in self.keys],
                             [v.expand(batch_size, -1, -1, -1) for v in self.values], config)


def dynamic_cache(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], config: PretrainedConfig
                  ) -> DynamicCache:
    """A fresh cache whose layers hold these per-layer (B, H_kv, S, D) tensors themselves, no copy:
    `update` concatenates into new tensors, leaving them intact (so a CUDA graph's static buffers
    can stand behind it)."""
    cache = DynamicCache(config=config)
    for layer, k, v in zip(cache.layers, keys, values, strict=True):
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
    return cache


def merge_anchor_caches(caches: Sequence[AnchorCache]) -> AnchorCache:
    """One cache holding several contexts' kept tokens side by side, each at its own original
    positions (so they overlap: structured prompting's groups, encoded independently at the same
    position offsets); a query attends to all of them and starts after the longest context."""
    offsets = np.cumsum([0] + [c.num_tokens for c in caches[:-1]])
    return AnchorCache(
        keys=tuple(torch.cat(layer, dim=2) for layer in zip(*(c.keys for c in caches), strict=True)),
        values=tuple(torch.cat(layer, dim=2) for layer in zip(*(c.values for c in caches), strict=True)),
        positions=tuple(p for c in caches for p in c.positions),
        context_length=max(c.context_length for c in caches),
        label_slots=tuple(int(o) + s for o, c in zip(offsets, caches, strict=True) for s in c.label_slots),
        label_classes=tuple(k for c in caches for k in c.label_classes),
        key_bias=_concat_bias(caches),
    )


def _concat_bias(caches: Sequence[AnchorCache]) -> torch.Tensor | None:
    """The caches' key biases one after another (zeros for a cache without), or None when none has one."""
    if all(c.key_bias is None for c in caches):
        return None
    device = caches[0].keys[0].device
    return torch.cat([c.key_bias if c.key_bias is not None else torch.zeros(c.num_tokens, device=device)
                      for c in caches])


def key_bias_row(caches: Sequence[AnchorCache], new_tokens: int) -> torch.Tensor | None:
    """(1, S + new_tokens) `AttentionPlan.key_bias` of a forward of `new_tokens` tokens (which get
    none) behind `caches` one after another (concat_dynamic_cache's order); None when no cache has one."""
    bias = _concat_bias(caches)
    return None if bias is None else torch.nn.functional.pad(bias, (0, new_tokens))[None]


def concat_dynamic_cache(caches: Sequence[AnchorCache], config: PretrainedConfig) -> DynamicCache:
    """A fresh batch-1 cache holding `caches` one after another along the sequence axis (a packed
    forward). One cache: its own tensors, nothing copied; several: one concatenation per layer
    (anchor caches are a few dozen tokens, so this is small next to the forward)."""
    if len(caches) == 1:
        return caches[0].as_dynamic_cache(1, config)
    keys = [torch.cat(layer, dim=2) for layer in zip(*(c.keys for c in caches), strict=True)]
    values = [torch.cat(layer, dim=2) for layer in zip(*(c.values for c in caches), strict=True)]
    return dynamic_cache(keys, values, config)


@torch.no_grad()  # not inference_mode: training β later needs these tensors inside autograd graphs
def build_anchor_cache(
    lm: LoadedModel, context_ids: Sequence[int], keep: Sequence[bool], label_positions: Sequence[int],
    label_classes: Sequence[int],
) -> AnchorCache:
    """Run the context once and keep K/V only where `keep` is True."""
    if len(keep) != len(context_ids):
        raise ValueError(f"keep mask has {len(keep)} entries for {len(context_ids)} context tokens")
    ids = torch.tensor([list(context_ids)], device=lm.device)
    out = lm.model.base_model(input_ids=ids, use_cache=True)
    kept = [i for i, k in enumerate(keep) if k]
    index = torch.tensor(kept, device=lm.device)
    keys, values = [], []
    for k, v, _ in out.cache:
        keys.append(k.index_select(2, index).contiguous())
        values.append(v.index_select(2, index).contiguous())
    slot = {pos: i for i, pos in enumerate(kept)}
    labels = [(slot[p], c) for p, c in zip(label_positions, label_classes, strict=True) if p in slot]
    return AnchorCache(
        keys=tuple(keys),
        values=tuple(values),
        positions=tuple(kept),
        context_length=len(context_ids),
        label_slots=tuple(s for s, _ in labels),
        label_classes=tuple(c for _, c in labels),
    )


@torch.no_grad()
def kv_bytes_per_token(lm: LoadedModel) -> int:
    """K/V bytes one token costs across all layers, measured rather than derived from config names
    (which differ between GPT-2, Llama, GPT-J ...)."""
    ids = torch.tensor([[lm.pad_token_id]], device=lm.device)
    out = lm.model.base_model(input_ids=ids, use_cache=True)
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v, _ in out.cache)


@torch.no_grad()
def extend_cache(lm: LoadedModel, cache: AnchorCache | None, ids: Sequence[int]) -> AnchorCache | None:
    """`cache` with `ids` run behind it and appended, every token kept; positions continue.

    Re-weighting only changes the target (last) row, so nothing before a query's last token depends
    on β: training caches it once per example and then runs one token per step.
    """
    if not ids:
        return cache
    start = cache.context_length if cache is not None else 0
    cached = cache.num_tokens if cache is not None else 0
    dynamic = cache.as_dynamic_cache(1, lm.model.config) if cache is not None else DynamicCache(config=lm.model.config)
    bias = key_bias_row([cache], len(ids)) if cache is not None else None
    out = lm.model.base_model(
        input_ids=torch.tensor([list(ids)], device=lm.device),
        attention_mask=torch.ones((1, cached + len(ids)), dtype=torch.long, device=lm.device),
        position_ids=torch.arange(start, start + len(ids), device=lm.device)[None],
        cache=dynamic,
        use_cache=True,
        anchor_plan=AttentionPlan(key_bias=bias) if bias is not None else None,
    )
    keys, values = zip(*((k.contiguous(), v.contiguous()) for k, v, _ in out.cache), strict=True)
    return AnchorCache(
        keys=tuple(keys),
        values=tuple(values),
        positions=(cache.positions if cache is not None else ()) + tuple(range(start, start + len(ids))),
        context_length=start + len(ids),
        label_slots=cache.label_slots if cache is not None else (),
        label_classes=cache.label_classes if cache is not None else (),
        key_bias=bias[0] if bias is not None else None,
    )
