"""The single attention function every anchorserve forward goes through.

It is registered with transformers' AttentionInterface (plus a mask function under the same name,
without which transformers silently drops the causal mask), so GPT-2, GPT-J, Llama, Qwen ... all
reach it without patching model classes. A forward with no plan takes the fast SDPA path. A plan
asks for interventions, computed per query head (after grouped-query K/V are repeated) and keyed
by `module.layer_idx`:

- record_weights: the written-out softmax(q·kᵀ)·v, returning the weights.
- reweighting (paper §3.1, Eq. 9): Â(q, p_i) = exp(β[l, h, c(i)]) · A(q, p_i) on the target row q
  only, post-softmax, not renormalised. The fast path keeps SDPA for the whole sequence and adds
  Σ_i (exp(β) − 1) · A(q, p_i) · v_{p_i} to the target row, which needs that row's softmax only.
  A packed forward (one batch row holding many requests, see packed.py) has several targets per
  batch row, each with its own β and label keys: the same formula, entry by entry.
- blocks: a packed forward's query spans, each of which sees only its rows' cache slots and its
  own tokens; SDPA then runs span by span over those keys under each span's own mask, computed
  from the sequence's `Segments`, instead of over the whole T × (S + T) square, most of which
  the mask forbids. The model's `attention_mask` is not read on that path.
- key_bias: an additive logit per key, e.g. structured prompting's log(1/G) on the anchors of G
  demonstration groups encoded side by side (many_shot.py), so that together they hold the
  attention one group would. SDPA paths get it as an additive mask, the written-out ones add it to
  the scores, rounded to the query's dtype on both.
- isolation (paper §2.2): chosen rows attend only to themselves in chosen layers, masked before
  softmax. It is a mask change, so it keeps the fast path.
- saliency (paper §2.1): the post-softmax weights are multiplied by a leaf of ones; after a
  backward pass its gradient is exactly A ⊙ ∂L/∂A (the ones-multiplier trick).
- capture: the target rows' weights (deep-layer analysis) and the per-head queries and keys of
  chosen layers (error diagnosis) are written into the plan's `Capture`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from anchor_cache import fused

ATTENTION_NAME = "anchor"


@dataclass(frozen=True)
class Reweighting:
    """β for every (layer, query head, class) and where the label words sit among the keys.

    Each entry p scales A(q, label_keys[p]) by exp(β[l, h, label_classes[p]]) on a target row q:
    on every target when `label_targets` is None (one β shared by a batch, keys relative to each
    batch row), else on target `label_targets[p]` only, an index into the plan's flattened targets
    (a packed forward: rows with their own β concatenated along the class axis, or none).
    """

    beta: torch.Tensor  # (L, Hq, C); zeros = vanilla; a leaf with requires_grad while training
    label_keys: torch.Tensor  # (P,) key index of each demonstration label word (cache slot or position)
    label_classes: torch.Tensor  # (P,) its class: several demonstrations of one class share one β
    label_targets: torch.Tensor | None = None  # (P,) target of each entry; None: every target

    @cached_property  # once per Reweighting: tasks keep theirs, so this copy is not per request
    def host_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """`label_keys` and `label_classes` on the host, for packing on the CPU (packed.Entries)."""
        return self.label_keys.cpu().numpy(), self.label_classes.cpu().numpy()

    def entries(self, n_targets: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(E,) target, key and class of every scaled weight."""
        if self.label_targets is not None:
            return self.label_targets, self.label_keys, self.label_classes
        per = self.label_keys.shape[0]
        targets = torch.arange(n_targets, device=self.label_keys.device).repeat_interleave(per)
        return targets, self.label_keys.repeat(n_targets), self.label_classes.repeat(n_targets)


@dataclass(frozen=True)
class Isolation:
    """Rows that may attend only to themselves, in the given layers (everything else unchanged)."""

    layers: frozenset[int]
    rows: torch.Tensor  # (B, T) bool over query positions


@dataclass
class Capture:
    """What the attention function wrote down during one forward, by layer index."""

    multipliers: dict[int, torch.Tensor] = field(default_factory=dict)  # saliency leaves (B, Hq, T, S)
    target_weights: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, Hq, S): A(q, ·) per head
    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, Hq, D) at each target
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, Hq, S, D), repeated per query head
    maps: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, T, S) weights summed over heads


@dataclass(frozen=True)
class Segments:
    """The mask of a packed sequence (packed.py) in O(S + T) numbers instead of T × (S + T): a token
    sees the cache slots of its own row's cache and, causally, its own row's earlier tokens. Keys
    are numbered as the model sees them, the S cache slots first, then the T tokens; any piece of
    the mask is `allowed(queries, keys)`."""

    query_row: torch.Tensor  # (T,) each token's row
    query_cache: torch.Tensor  # (T,) its row's cache; -1: none
    key_row: torch.Tensor  # (S + T,) the key's row; -1 on cache slots, which belong to no row
    key_cache: torch.Tensor  # (S + T,) the key's cache; -2 on tokens, so no query's cache matches

    @classmethod
    def build(cls, lengths: Sequence[int], row_cache: Sequence[int], cache_sizes: Sequence[int],
              device: torch.device) -> Segments:
        """Rows of `lengths` tokens laid out in order, row i using cache `row_cache[i]` (-1: none),
        caches of `cache_sizes` slots laid out in order; built on the CPU, copied once."""
        rows = torch.arange(len(lengths))
        counts = torch.tensor(lengths, dtype=torch.long)
        query_row = rows.repeat_interleave(counts)
        query_cache = torch.tensor(row_cache, dtype=torch.long).repeat_interleave(counts)
        slot_cache = torch.arange(len(cache_sizes)).repeat_interleave(torch.tensor(cache_sizes, dtype=torch.long))
        slots, tokens = slot_cache.shape[0], query_row.shape[0]
        key_row = torch.cat([torch.full((slots,), -1), query_row])
        key_cache = torch.cat([slot_cache, torch.full((tokens,), -2)])
        return cls(*(t.to(device) for t in (query_row, query_cache, key_row, key_cache)))

    @property
    def cached(self) -> int:
        """S, the cache slots in front of the tokens."""
        return self.key_row.shape[0] - self.query_row.shape[0]

    def allowed(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(..., L, K) bool, True = may attend: token queries (..., L) against keys (..., K)."""
        q, k = queries[..., :, None], keys[..., None, :]
        own_cache = self.key_cache[k] == self.query_cache[q]
        own_row = (self.key_row[k] == self.query_row[q]) & (k - self.cached <= q)  # slots: always <= q
        return own_cache | own_row


@dataclass(frozen=True)
class Blocks:
    """Spans [start, end) of a batch-1 packed sequence, each query seeing no key outside its rows'
    cache slots and the span's own tokens. The fast path gathers the spans into a (n, ·, L, ·)
    batch, padding a short span by repeating its last token and a short list of cache slots by
    repeating a slot (a repeated key is masked, a repeated query dropped), and runs one SDPA call
    on it under `allowed`, each span's mask. With many tasks in a batch, each span reads only its
    own tasks' caches."""

    spans: tuple[tuple[int, int], ...]  # cover the queries in order
    queries: torch.Tensor  # (n, L) query index of each span slot
    keys: torch.Tensor  # (n, C + L) key index: the span's cache slots, then the span's own tokens
    allowed: torch.Tensor  # (n, 1, L, C + L) bool: each span's mask, False on padding repeats
    order: torch.Tensor  # (T,) each query's slot in the flattened (n·L) span batch
    segments: Segments  # the whole mask, for the rows of re-weighted and captured targets

    @classmethod
    def build(cls, spans: tuple[tuple[int, int], ...], cache_slots: Sequence[Sequence[int]],
              segments: Segments) -> Blocks:
        """`cache_slots[i]`: the cache slots span i's rows use. Indices are built on the CPU and
        copied once; the spans' mask is one broadcast comparison on the segments' device."""
        n, device = len(spans), segments.key_row.device
        starts = torch.tensor([start for start, _ in spans])
        sizes = torch.tensor([end - start for start, end in spans])
        longest = int(sizes.max())
        widest = max(len(slots) for slots in cache_slots)
        slot = torch.arange(longest)
        queries = starts[:, None] + torch.minimum(slot[None], sizes[:, None] - 1)  # (n, L)
        cache_keys = torch.tensor([list(slots) + [0] * (widest - len(slots)) for slots in cache_slots],
                                  dtype=torch.long).reshape(n, widest)
        real_cache = torch.arange(widest)[None] < torch.tensor([len(slots) for slots in cache_slots])[:, None]
        keys = torch.cat([cache_keys, segments.cached + queries], dim=1)
        real = torch.cat([real_cache, slot[None] < sizes[:, None]], dim=1)  # (n, C + L) False on repeats
        # query t of span i sits at i·L + (t - start_i)
        order = torch.arange(int(sizes.sum())) + (torch.arange(n) * longest - starts).repeat_interleave(sizes)
        queries, keys, real, order = (t.to(device) for t in (queries, keys, real, order))
        allowed = segments.allowed(queries, keys) & real[:, None, :]
        return cls(spans, queries, keys, allowed[:, None], order, segments)


@dataclass(frozen=True)
class AttentionPlan:
    """Per-forward instructions, passed to the model as the `anchor_plan` keyword.

    record_weights: return the post-softmax weights (B, Hq, T, S) as the function's second value,
        which transformers collects into `outputs.attentions` when `output_attentions=True`.
    saliency: multiply the weights by a ones leaf per layer, kept in `capture.multipliers`.
    capture_target_weights: keep each target row's weights in `capture.target_weights`.
    capture_qk_layers: layers whose target queries and keys go to `capture.queries`/`capture.keys`.
    capture_maps: keep every layer's full weights, summed over heads, in `capture.maps` (large).
    key_bias: (B|1, S) added to every query's logit for each key before the softmax; None: none.
    explicit: compute every intervention on the written-out attention matrix (the reference path).
    blocks: run the fast path's SDPA per query span of a packed sequence, under the spans' own mask;
        the model's `attention_mask` is then a placeholder, so the written-out paths and isolation,
        which read it, refuse blocks.
    target_window: W, when no row is longer: a re-weighted target's softmax is then taken over
        the cache slots and the W tokens ending at it (every key its row may see) instead of over
        the whole packed sequence, which at batch 256 is ~8,000 keys for each of 256 targets.
    target_entries: with a target window, the most re-weighted entries any target has (the fused
        kernel's block, fused.py).
    targets: (B,) query index of each row's last token, the q of re-weighting and capture; filled
        in by the forward, which knows the padding. (B, R): R targets per batch row (a packed
        forward). Targets are flattened row-major to N = B·R; captures are indexed by that order.
    """

    record_weights: bool = False
    reweighting: Reweighting | None = None
    isolation: Isolation | None = None
    saliency: bool = False
    capture_target_weights: bool = False
    capture_qk_layers: frozenset[int] = frozenset()
    capture_maps: bool = False
    key_bias: torch.Tensor | None = None
    explicit: bool = False
    blocks: Blocks | None = None
    target_window: int | None = None
    target_entries: int = 0
    targets: torch.Tensor | None = None
    capture: Capture = field(default_factory=Capture)

    def __post_init__(self):
        if self.blocks is not None and (self.needs_explicit or self.isolation is not None):
            raise ValueError("blocks bring their own mask; the written-out attention and isolation need the dense one")
        if self.target_window is not None and (self.blocks is None or self.capture_target_weights):
            raise ValueError("a target window needs blocks' segments, and captures want every key's weight")

    @property
    def needs_explicit(self) -> bool:
        return self.record_weights or self.explicit or self.saliency or self.capture_maps

    @cached_property  # once per forward (the forward sets `targets` with dataclasses.replace)
    def target_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) batch row and (N,) query index of every target, flattened row-major."""
        targets = self.targets if self.targets.ndim == 2 else self.targets[:, None]
        rows = torch.arange(targets.shape[0], device=targets.device).repeat_interleave(targets.shape[1])
        return rows, targets.reshape(-1)

    @cached_property
    def reweight_entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(E,) target (into `target_index`), key and class of every re-weighted attention weight."""
        return self.reweighting.entries(self.target_index[1].shape[0])

    @cached_property
    def window_keys(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """With `target_window` W: (N, S + W) each target's keys (every cache slot, then the W tokens
        ending at it), (N, S + W) which of them it may see, and (E,) where each re-weighted entry's
        key sits among its target's keys (rows fit the window, so every label key does)."""
        segments, width = self.blocks.segments, self.target_window
        slots, targets = segments.cached, self.target_index[1]
        first = targets - (width - 1)  # (N,) the window's first token
        tokens = first[:, None] + torch.arange(width, device=targets.device)  # (N, W)
        keys = torch.cat([torch.arange(slots, device=targets.device).expand(targets.shape[0], slots),
                          slots + tokens.clamp(min=0)], dim=1)
        allowed = segments.allowed(targets[:, None], keys)[:, 0]
        allowed = allowed & torch.cat([keys[:, :slots] >= 0, tokens >= 0], dim=1)
        e_target, e_key, _ = self.reweight_entries
        local = torch.where(e_key < slots, e_key, e_key - first[e_target])
        return keys, allowed, local

    @cached_property
    def entry_offsets(self) -> torch.Tensor:
        """(N + 1,) where each target's re-weighted entries start; a packed forward lays them out
        sorted by target (packed.Entries)."""
        e_target = self.reweight_entries[0]
        return torch.searchsorted(e_target, torch.arange(self.target_index[1].shape[0] + 1, device=e_target.device))

    @cached_property
    def beta_scale(self) -> torch.Tensor:
        """(L, Hq, C) float32 exp(β) − 1 of every layer, once per forward."""
        return torch.exp(self.reweighting.beta).float() - 1

    @cached_property
    def target_mask(self) -> torch.Tensor:
        """(1, N, S + T) the targets' rows of a blocked (batch-1) plan's mask, from its segments."""
        segments = self.blocks.segments
        keys = torch.arange(segments.key_row.shape[0], device=segments.key_row.device)
        return segments.allowed(self.target_index[1], keys)[None]


def _bool_mask(mask: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """(B|1, 1, T, S) boolean "may attend"; SDPA masks may be skipped (None) when purely causal."""
    if mask is None:
        # Queries are the last q_len keys: row i sees keys up to kv_len - q_len + i.
        rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        return (torch.arange(kv_len, device=device)[None, :] <= rows)[None, None]
    if mask.dtype != torch.bool:
        return mask > torch.finfo(mask.dtype).min / 2
    return mask


def _with_bias(allowed: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive mask: `bias` (broadcast over the trailing key axis) where allowed, else the dtype's min."""
    return torch.where(allowed, bias.to(dtype), torch.finfo(dtype).min)


def _plan_mask(
    module: torch.nn.Module, attention_mask: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device,
    plan: AttentionPlan,
) -> torch.Tensor | None:
    """The model's mask, with isolated rows (if this layer isolates any) limited to their own key."""
    iso = plan.isolation
    if iso is None or module.layer_idx not in iso.layers:
        return attention_mask
    allowed = _bool_mask(attention_mask, q_len, kv_len, device)
    own_key = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    only_self = torch.arange(kv_len, device=device)[None, :] == own_key  # (T, S)
    return torch.where(iso.rows[:, None, :, None], only_self, allowed)


def _label_scale(module: torch.nn.Module, rw: Reweighting, classes: torch.Tensor) -> torch.Tensor:
    """(Hq, E) exp(β) for this layer, one column per re-weighted entry."""
    return torch.exp(rw.beta[module.layer_idx].index_select(1, classes))


def explicit_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    plan: AttentionPlan,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q·kᵀ·scale + mask), interventions, then ·v: the reference the fast path must match."""
    n_rep = getattr(module, "num_key_value_groups", 1)  # GPT-2 modules do not define it
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)  # (B, Hq, S, D)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale  # (B, Hq, T, S)
    if plan.key_bias is not None:
        scores = scores + plan.key_bias[:, None, None, :].to(scores.dtype)
    allowed = _bool_mask(attention_mask, query.shape[2], key.shape[2], query.device)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    rw = plan.reweighting
    if rw is not None:
        batch, heads, q_len, kv_len = probs.shape
        multiplier = torch.ones(batch, q_len, kv_len, heads, dtype=probs.dtype, device=probs.device)
        t_rows, t_query = plan.target_index
        e_target, e_key, e_class = plan.reweight_entries
        # (E, Hq) at [row, query, key, h] of each entry's target = exp(β[l, h, class])
        scale = _label_scale(module, rw, e_class).T.to(probs.dtype)
        multiplier = multiplier.index_put((t_rows[e_target], t_query[e_target], e_key), scale)
        probs = probs * multiplier.permute(0, 3, 1, 2)
    if plan.saliency:
        ones = torch.ones_like(probs, requires_grad=True)
        plan.capture.multipliers[module.layer_idx] = ones
        probs = probs * ones
    if plan.capture_target_weights:
        t_rows, t_query = plan.target_index
        plan.capture.target_weights[module.layer_idx] = probs[t_rows, :, t_query].detach()
    if plan.capture_maps:
        plan.capture.maps[module.layer_idx] = probs.detach().sum(1)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()  # (B, T, Hq, D)
    return out, probs


def _mask_rows(attention_mask: torch.Tensor | None, targets: torch.Tensor, q_len: int, kv_len: int,
               device: torch.device) -> torch.Tensor:
    """(B, R, S) the rows of a dense mask at `targets`, (B,) or (B, R) query indices."""
    targets = targets if targets.ndim == 2 else targets[:, None]
    batch, per = targets.shape
    allowed = _bool_mask(attention_mask, q_len, kv_len, device)[:, 0].expand(batch, -1, -1)  # (B, T, S)
    return allowed.gather(1, targets[:, :, None].expand(batch, per, kv_len))


def target_row_weights(
    query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor, scaling: float | None,
    targets: torch.Tensor, key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, Hq, S) float32 softmax of each target query against all keys, grouped K/V as is.

    `targets` is (B,) or (B, R) query indices, flattened row-major to N = B·R, and `allowed`
    (B, R, S) their rows of the mask. Only these N rows are computed, O(N·Hq·S·D): what the fast
    path needs to correct or report a row without writing out the full attention matrix.
    """
    batch, heads, _, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    targets = targets if targets.ndim == 2 else targets[:, None]  # (B, R)
    per = targets.shape[1]
    q = query.gather(2, targets[:, None, :, None].expand(batch, heads, per, dim))  # (B, Hq, R, D)
    q = q.reshape(batch, kv_heads, heads // kv_heads * per, dim)  # query head h = g·rep + r
    scale = scaling if scaling is not None else dim**-0.5
    scores = torch.matmul(q, key.transpose(2, 3)).view(batch, heads, per, kv_len).float() * scale  # (B, Hq, R, S)
    if key_bias is not None:  # rounded as SDPA's additive mask rounds it, so the correction matches
        scores = scores + key_bias[:, None, None, :].to(query.dtype).float()
    scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1).transpose(1, 2).reshape(batch * per, heads, kv_len)


def window_row_weights(query: torch.Tensor, key: torch.Tensor, plan: AttentionPlan, scaling: float | None,
                       key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """(N, Hq, S + W) float32 softmax of each target of a batch-1 packed forward over its window
    (`AttentionPlan.window_keys`): `target_row_weights` over only the keys its row may see."""
    keys, allowed, _ = plan.window_keys
    n, width = keys.shape
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[3]
    q = query[0].index_select(1, plan.target_index[1]).transpose(0, 1)  # (N, Hq, D)
    q = q.reshape(n, kv_heads, heads // kv_heads, dim)  # query head h = g·rep + r
    k = key[0].index_select(1, keys.reshape(-1)).view(kv_heads, n, width, dim).transpose(0, 1)  # (N, Hkv, K, D)
    scale = scaling if scaling is not None else dim**-0.5
    scores = torch.matmul(q, k.transpose(2, 3)).reshape(n, heads, width).float() * scale
    if key_bias is not None:  # rounded as SDPA's additive mask rounds it, so the correction matches
        scores = scores + key_bias[0, keys].to(query.dtype).float()[:, None, :]
    scores = scores.masked_fill(~allowed[:, None, :], torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1)


def reweight_target_rows(
    module: torch.nn.Module, out: torch.Tensor, weights: torch.Tensor, value: torch.Tensor, plan: AttentionPlan
) -> torch.Tensor:
    """Add Σ_i (exp(β) − 1)·A(q, p_i)·v_{p_i} to each target position of an SDPA output (B, T, Hq, D)."""
    rw = plan.reweighting
    heads, kv_heads = weights.shape[1], value.shape[1]
    t_rows, t_query = plan.target_index
    e_target, e_key, e_class = plan.reweight_entries
    weight_key = plan.window_keys[2] if plan.target_window is not None else e_key  # where p_i is in `weights`
    label_probs = weights[e_target, :, weight_key]  # (E, Hq) = A(q, p_i)
    scaled = label_probs * (_label_scale(module, rw, e_class).float().T - 1)  # (E, Hq)
    v = value[t_rows[e_target], :, e_key]  # (E, Hkv, D)
    v = v.repeat_interleave(heads // kv_heads, dim=1).float()  # (E, Hq, D): tiny, label keys only
    correction = torch.zeros(weights.shape[0], heads, v.shape[-1], dtype=v.dtype, device=v.device)
    correction = correction.index_add(0, e_target, scaled[..., None] * v)  # (N, Hq, D)
    return out.index_put((t_rows, t_query), correction.to(out.dtype), accumulate=True)


def blocked_sdpa(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocks: Blocks,
    dropout: float, scaling: float | None, key_bias: torch.Tensor | None = None, **kwargs,
) -> torch.Tensor:
    """(1, T, Hq, D): one SDPA call over the spans gathered into a batch, each seeing its cache keys
    and its own tokens under its own mask; equal to SDPA over the whole sequence under the packed
    mask, for a fraction of the work."""
    assert query.shape[0] == 1, "blocks describe a packed batch of one row"
    n, span = blocks.queries.shape
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[3]
    q_index, k_index = blocks.queries.reshape(-1), blocks.keys.reshape(-1)
    q = query[0].index_select(1, q_index).view(heads, n, span, dim).transpose(0, 1)  # (n, Hq, L, D)
    k = key[0].index_select(1, k_index).view(kv_heads, n, -1, dim).transpose(0, 1)  # (n, Hkv, S + L, D)
    v = value[0].index_select(1, k_index).view(kv_heads, n, -1, dim).transpose(0, 1)
    mask = blocks.allowed
    if key_bias is not None:  # (1, S + T) -> (n, 1, 1, C + L) along each span's keys
        mask = _with_bias(mask, key_bias[0].index_select(0, k_index).view(n, 1, 1, -1), query.dtype)
    out, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scaling, **kwargs)
    return out.reshape(n * span, heads, dim).index_select(0, blocks.order)[None]  # (n, L, Hq, D) -> (1, T, Hq, D)


def _capture_qk(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, plan: AttentionPlan) -> None:
    t_rows, t_query = plan.target_index
    plan.capture.queries[module.layer_idx] = query[t_rows, :, t_query].detach()
    plan.capture.keys[module.layer_idx] = repeat_kv(key, query.shape[1] // key.shape[1]).detach()


def anchor_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    anchor_plan: AttentionPlan | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    plan = anchor_plan
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)[0], None
    mask = _plan_mask(module, attention_mask, query.shape[2], key.shape[2], query.device, plan)
    if module.layer_idx in plan.capture_qk_layers:
        _capture_qk(module, query, key, plan)
    if plan.needs_explicit:
        return explicit_attention(module, query, key, value, mask, scaling, plan)
    bias = plan.key_bias
    if plan.blocks is not None:
        out = blocked_sdpa(module, query, key, value, plan.blocks, dropout, scaling, bias, **kwargs)
    else:
        dense_mask = mask
        if bias is not None:
            allowed = _bool_mask(mask, query.shape[2], key.shape[2], query.device)
            dense_mask = _with_bias(allowed, bias[:, None, None, :], query.dtype)
        out, _ = sdpa_attention_forward(module, query, key, value, dense_mask, dropout=dropout, scaling=scaling,
                                        **kwargs)
    if plan.reweighting is not None and plan.target_window is not None and fused.available(query):
        keys, allowed, local = plan.window_keys
        out = fused.reweight_in_place(out, query, key, value, keys, allowed, plan.target_index[1], plan.entry_offsets,
                                      local, plan.reweight_entries[2], plan.beta_scale[module.layer_idx],
                                      bias[0] if bias is not None else None,
                                      scaling if scaling is not None else query.shape[-1] ** -0.5,
                                      plan.target_entries)
    elif plan.reweighting is not None or plan.capture_target_weights:
        if plan.target_window is not None:
            weights = window_row_weights(query, key, plan, scaling, bias)
        else:
            if plan.blocks is not None:
                allowed = plan.target_mask
            else:
                allowed = _mask_rows(mask, plan.targets, query.shape[2], key.shape[2], query.device)
            weights = target_row_weights(query, key, allowed, scaling, plan.targets, bias)
        if plan.capture_target_weights:
            plan.capture.target_weights[module.layer_idx] = weights.detach()
        if plan.reweighting is not None:
            out = reweight_target_rows(module, out, weights, value, plan)
    return out, None


def register_attention() -> None:
    """Idempotent: registers the function and SDPA's boolean mask builder under one name."""
    AttentionInterface.register(ATTENTION_NAME, anchor_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
