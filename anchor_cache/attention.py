"""The single attention function every anchorserve forward goes through.

It is registered with transformers' AttentionInterface (plus a mask function under the same name,
without which transformers silently drops the causal mask), so GPT-2, GPT-J, Llama, Qwen ... all
reach it without patching model classes. A forward with no plan takes the fast SDPA path. A plan
asks for interventions that need the explicit softmax(q·kᵀ) matrix, which is computed per query
head, after grouped-query K/V are repeated, keyed by `module.layer_idx`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "anchor"


@dataclass(frozen=True)
class AttentionPlan:
    """Per-forward instructions, passed to the model as the `anchor_plan` keyword.

    record_weights: return the post-softmax weights (B, Hq, T, S) as the function's second value,
        which transformers collects into `outputs.attentions` when `output_attentions=True`.
    """

    record_weights: bool = False

    @property
    def needs_explicit(self) -> bool:
        return self.record_weights


def _bool_mask(mask: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """(B|1, 1, T, S) boolean "may attend"; SDPA masks may be skipped (None) when purely causal."""
    if mask is None:
        # Queries are the last q_len keys: row i sees keys up to kv_len - q_len + i.
        rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        return (torch.arange(kv_len, device=device)[None, :] <= rows)[None, None]
    if mask.dtype != torch.bool:
        return mask > torch.finfo(mask.dtype).min / 2
    return mask


def explicit_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    plan: AttentionPlan,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q·kᵀ·scale + mask)·v written out, the reference the fast path must match."""
    n_rep = getattr(module, "num_key_value_groups", 1)  # GPT-2 modules do not define it
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)  # (B, Hq, S, D)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale  # (B, Hq, T, S)
    allowed = _bool_mask(attention_mask, query.shape[2], key.shape[2], query.device)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()  # (B, T, Hq, D)
    return out, probs


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
    if anchor_plan is None or not anchor_plan.needs_explicit:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    return explicit_attention(module, query, key, value, attention_mask, scaling, anchor_plan)


def register_attention() -> None:
    """Idempotent: registers the function and SDPA's boolean mask builder under one name."""
    AttentionInterface.register(ATTENTION_NAME, anchor_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
