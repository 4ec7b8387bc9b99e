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
- isolation (paper §2.2): chosen rows attend only to themselves in chosen layers, masked before
  softmax. It is a mask change, so it keeps the fast path.
- saliency (paper §2.1): the post-softmax weights are multiplied by a leaf of ones; after a
  backward pass its gradient is exactly A ⊙ ∂L/∂A (the ones-multiplier trick).
- capture: the target rows' weights (deep-layer analysis) and the per-head queries and keys of
  chosen layers (error diagnosis) are written into the plan's `Capture`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "anchor"


@dataclass(frozen=True)
class Reweighting:
    """β for every (layer, query head, class) and where the label words sit among the keys."""

    beta: torch.Tensor  # (L, Hq, C); zeros = vanilla; a leaf with requires_grad while training
    label_keys: torch.Tensor  # (P,) key index of each demonstration label word (cache slot or position)
    label_classes: torch.Tensor  # (P,) its class: several demonstrations of one class share one β


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
class AttentionPlan:
    """Per-forward instructions, passed to the model as the `anchor_plan` keyword.

    record_weights: return the post-softmax weights (B, Hq, T, S) as the function's second value,
        which transformers collects into `outputs.attentions` when `output_attentions=True`.
    saliency: multiply the weights by a ones leaf per layer, kept in `capture.multipliers`.
    capture_target_weights: keep each target row's weights in `capture.target_weights`.
    capture_qk_layers: layers whose target queries and keys go to `capture.queries`/`capture.keys`.
    capture_maps: keep every layer's full weights, summed over heads, in `capture.maps` (large).
    explicit: compute every intervention on the written-out attention matrix (the reference path).
    targets: (B,) query index of each row's last token, the q of re-weighting and capture; filled
        in by the forward, which knows the padding.
    """

    record_weights: bool = False
    reweighting: Reweighting | None = None
    isolation: Isolation | None = None
    saliency: bool = False
    capture_target_weights: bool = False
    capture_qk_layers: frozenset[int] = frozenset()
    capture_maps: bool = False
    explicit: bool = False
    targets: torch.Tensor | None = None
    capture: Capture = field(default_factory=Capture)

    @property
    def needs_explicit(self) -> bool:
        return self.record_weights or self.explicit or self.saliency or self.capture_maps


def _bool_mask(mask: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """(B|1, 1, T, S) boolean "may attend"; SDPA masks may be skipped (None) when purely causal."""
    if mask is None:
        # Queries are the last q_len keys: row i sees keys up to kv_len - q_len + i.
        rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        return (torch.arange(kv_len, device=device)[None, :] <= rows)[None, None]
    if mask.dtype != torch.bool:
        return mask > torch.finfo(mask.dtype).min / 2
    return mask


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


def _label_scale(module: torch.nn.Module, rw: Reweighting) -> torch.Tensor:
    """(Hq, P) exp(β) for this layer, one column per label key."""
    return torch.exp(rw.beta[module.layer_idx].index_select(1, rw.label_classes))


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
    allowed = _bool_mask(attention_mask, query.shape[2], key.shape[2], query.device)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    rw = plan.reweighting
    if rw is not None:
        batch, heads, q_len, kv_len = probs.shape
        multiplier = torch.ones(batch, q_len, kv_len, heads, dtype=probs.dtype, device=probs.device)
        rows = torch.arange(batch, device=probs.device)
        # (B, P, Hq) block at [b, targets[b], label_keys[p], h] = exp(β[l, h, class(p)])
        scale_rows = _label_scale(module, rw).T.to(probs.dtype).expand(batch, -1, -1)
        multiplier = multiplier.index_put((rows[:, None], plan.targets[:, None], rw.label_keys[None, :]), scale_rows)
        probs = probs * multiplier.permute(0, 3, 1, 2)
    if plan.saliency:
        ones = torch.ones_like(probs, requires_grad=True)
        plan.capture.multipliers[module.layer_idx] = ones
        probs = probs * ones
    if plan.capture_target_weights:
        rows = torch.arange(probs.shape[0], device=probs.device)
        plan.capture.target_weights[module.layer_idx] = probs[rows, :, plan.targets].detach()
    if plan.capture_maps:
        plan.capture.maps[module.layer_idx] = probs.detach().sum(1)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()  # (B, T, Hq, D)
    return out, probs


def target_row_weights(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None,
    targets: torch.Tensor,
) -> torch.Tensor:
    """(B, Hq, S) float32 softmax of each row's target query against all keys, grouped K/V as is.

    Only these B rows are computed, O(B·Hq·S·D): what the fast path needs to correct or report
    one row without writing out the full attention matrix.
    """
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    rows = torch.arange(batch, device=query.device)
    q = query[rows, :, targets].view(batch, kv_heads, heads // kv_heads, dim)  # (B, Hkv, rep, D)
    scale = scaling if scaling is not None else dim**-0.5
    scores = torch.einsum("bgrd,bgsd->bgrs", q, key).reshape(batch, heads, kv_len).float() * scale  # (B, Hq, S)
    allowed = _bool_mask(attention_mask, q_len, kv_len, query.device)
    allowed = allowed.expand(batch, -1, -1, -1)[rows, 0, targets]  # (B, S)
    scores = scores.masked_fill(~allowed[:, None, :], torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1)


def reweight_target_rows(
    module: torch.nn.Module, out: torch.Tensor, weights: torch.Tensor, value: torch.Tensor, plan: AttentionPlan
) -> torch.Tensor:
    """Add Σ_i (exp(β) − 1)·A(q, p_i)·v_{p_i} to each row's target position of an SDPA output."""
    rw = plan.reweighting
    heads, kv_heads = weights.shape[1], value.shape[1]
    rows = torch.arange(out.shape[0], device=out.device)
    label_probs = weights.index_select(2, rw.label_keys)  # (B, Hq, P) = A(q, p_i)
    scaled = label_probs * (_label_scale(module, rw).float() - 1)  # (B, Hq, P)
    v = value.index_select(2, rw.label_keys)  # (B, Hkv, P, D)
    v = v.repeat_interleave(heads // kv_heads, dim=1)  # (B, Hq, P, D): tiny, P label keys only
    correction = torch.einsum("bhp,bhpd->bhd", scaled, v.float()).to(out.dtype)  # (B, Hq, D)
    return out.index_put((rows, plan.targets), out[rows, plan.targets] + correction)


def _capture_qk(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, plan: AttentionPlan) -> None:
    rows = torch.arange(query.shape[0], device=query.device)
    plan.capture.queries[module.layer_idx] = query[rows, :, plan.targets].detach()
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
    out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    if plan.reweighting is not None or plan.capture_target_weights:
        weights = target_row_weights(query, key, mask, scaling, plan.targets)
        if plan.capture_target_weights:
            plan.capture.target_weights[module.layer_idx] = weights.detach()
        if plan.reweighting is not None:
            out = reweight_target_rows(module, out, weights, value, plan)
    return out, None


def register_attention() -> None:
    """Idempotent: registers the function and SDPA's boolean mask builder under one name."""
    AttentionInterface.register(ATTENTION_NAME, anchor_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
