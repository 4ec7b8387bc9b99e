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
"""

from __future__ import annotations

from dataclasses import dataclass

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
class AttentionPlan:
    """Per-forward instructions, passed to the model as the `anchor_plan` keyword.

    record_weights: return the post-softmax weights (B, Hq, T, S) as the function's second value,
        which transformers collects into `outputs.attentions` when `output_attentions=True`.
    explicit: compute every intervention on the written-out attention matrix (the reference path).
    targets: (B,) query index of each row's last token, the q of re-weighting; filled in by the
        forward, which knows the padding.
    """

    record_weights: bool = False
    reweighting: Reweighting | None = None
    explicit: bool = False
    targets: torch.Tensor | None = None

    @property
    def needs_explicit(self) -> bool:
        return self.record_weights or self.explicit


def _bool_mask(mask: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """(B|1, 1, T, S) boolean "may attend"; SDPA masks may be skipped (None) when purely causal."""
    if mask is None:
        # Queries are the last q_len keys: row i sees keys up to kv_len - q_len + i.
        rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        return (torch.arange(kv_len, device=device)[None, :] <= rows)[None, None]
    if mask.dtype != torch.bool:
        return mask > torch.finfo(mask.dtype).min / 2
    return mask


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
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()  # (B, T, Hq, D)
    return out, probs


def reweight_target_rows(
    module: torch.nn.Module,
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    plan: AttentionPlan,
) -> torch.Tensor:
    """Add Σ_i (exp(β) − 1)·A(q, p_i)·v_{p_i} to each row's target position of an SDPA output.

    Only the B target rows' softmax is needed: their scores against all S keys give the
    log-sum-exp, hence A(q, p_i) for the P label keys. Cost O(B·Hq·S·D), next to nothing.
    """
    rw = plan.reweighting
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    rows = torch.arange(batch, device=query.device)
    q = query[rows, :, plan.targets].view(batch, kv_heads, heads // kv_heads, dim)  # (B, Hkv, rep, D)
    scale = scaling if scaling is not None else dim**-0.5
    scores = torch.einsum("bgrd,bgsd->bgrs", q, key).reshape(batch, heads, kv_len).float() * scale  # (B, Hq, S)
    allowed = _bool_mask(attention_mask, q_len, kv_len, query.device)
    allowed = allowed.expand(batch, -1, -1, -1)[rows, 0, plan.targets]  # (B, S)
    scores = scores.masked_fill(~allowed[:, None, :], torch.finfo(scores.dtype).min)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    label_probs = torch.exp(scores.index_select(2, rw.label_keys) - lse)  # (B, Hq, P) = A(q, p_i)
    weights = label_probs * (_label_scale(module, rw).float() - 1)  # (B, Hq, P)
    v = value.index_select(2, rw.label_keys)  # (B, Hkv, P, D)
    v = v.repeat_interleave(heads // kv_heads, dim=1)  # (B, Hq, P, D): tiny, P label keys only
    correction = torch.einsum("bhp,bhpd->bhd", weights, v.float()).to(out.dtype)  # (B, Hq, D)
    return out.index_put((rows, plan.targets), out[rows, plan.targets] + correction)


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
    if anchor_plan is not None and anchor_plan.needs_explicit:
        return explicit_attention(module, query, key, value, attention_mask, scaling, anchor_plan)
    out, _ = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )
    if anchor_plan is not None and anchor_plan.reweighting is not None:
        out = reweight_target_rows(module, out, query, key, value, attention_mask, scaling, anchor_plan)
    return out, None


def register_attention() -> None:
    """Idempotent: registers the function and SDPA's boolean mask builder under one name."""
    AttentionInterface.register(ATTENTION_NAME, anchor_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
