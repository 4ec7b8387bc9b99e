"""Run padded batches of queries behind a prefix and read the last position.

A prefix is what stands before each query: an AnchorCache (K/V only), real tokens re-encoded every
time (vanilla, Text_anchor), both, or nothing (zero-shot). Queries are right-padded; the 2-D
attention mask covers cached plus new tokens, and position ids are explicit, since transformers
would otherwise start a compressed cache's query at M instead of at the original offset.

Serving does not pad: packed.py runs a batch of any tasks' queries as one sequence. This padded
forward stays for plans that need a batch row per query (analyses' captures, isolation, explicit
weights) and for β training, and as the reference the packed forward is tested against.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from anchor_cache.attention import AttentionPlan
from anchor_cache.cache import AnchorCache, key_bias_row
from anchor_cache.errors import ValidationError
from anchor_cache.models import LoadedModel


def to_device(values: Sequence | np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host numbers as a tensor on `device`. To a GPU through pinned memory without blocking, so the
    host does not wait for the device's queue to drain (as a plain copy does): the server prepares
    the next batch while the device still runs the last one (server/inprocess.py)."""
    tensor = torch.as_tensor(values)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class Prefix:
    cache: AnchorCache | None = None
    ids: tuple[int, ...] = ()

    @property
    def first_position(self) -> int:
        return self.cache.context_length if self.cache is not None else 0

    @property
    def kv_bytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0

    def tokens_per_request(self, query_len: int) -> int:
        """Tokens the model runs per request: re-encoded prefix tokens plus the query."""
        return len(self.ids) + query_len


def last_hidden(
    lm: LoadedModel, prefix: Prefix, queries: Sequence[Sequence[int]], plan: AttentionPlan | None = None
) -> torch.Tensor:
    """(B, hidden) final-norm hidden state at each query's last token."""
    rows = [list(prefix.ids) + list(q) for q in queries]
    lengths = torch.tensor([len(r) for r in rows], device=lm.device)
    if int(lengths.min()) == 0:
        raise ValidationError("cannot classify an empty token sequence")
    longest = int(lengths.max())
    limit = lm.max_positions
    if limit is not None and prefix.first_position + longest > limit:
        raise ValidationError(
            f"prompt needs {prefix.first_position + longest} positions but the model supports {limit}; "
            "shorten the input"
        )
    batch = len(rows)
    input_ids = torch.full((batch, longest), lm.pad_token_id, dtype=torch.long, device=lm.device)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, device=lm.device)
    cached = prefix.cache.num_tokens if prefix.cache is not None else 0
    attention_mask = torch.ones((batch, cached + longest), dtype=torch.long, device=lm.device)
    attention_mask[:, cached:] = torch.arange(longest, device=lm.device)[None, :] < lengths[:, None]
    position_ids = (torch.arange(longest, device=lm.device) + prefix.first_position).expand(batch, -1)
    cache = prefix.cache.as_dynamic_cache(batch, lm.model.config) if prefix.cache is not None else None
    bias = key_bias_row([prefix.cache], longest) if prefix.cache is not None else None
    if bias is not None:
        plan = dataclasses.replace(plan or AttentionPlan(), key_bias=bias)
    if plan is not None:
        plan = dataclasses.replace(plan, targets=lengths - 1)  # each row's last token: the q of re-weighting
    out = lm.model.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=cache is not None,
        anchor_plan=plan,
    )
    return out.last_hidden_state[torch.arange(batch, device=lm.device), lengths - 1]


def label_logits(lm: LoadedModel, hidden: torch.Tensor, label_ids: Sequence[int]) -> torch.Tensor:
    """(B, C) logits of the label words only: C rows of the LM head instead of the whole vocabulary."""
    head = lm.model.get_output_embeddings()
    index = to_device(list(label_ids), hidden.device)
    logits = hidden @ head.weight.index_select(0, index).T
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias.index_select(0, index)
    return logits.float()


def vocab_logits(lm: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
    """(B, V) full-vocabulary logits, needed only for word loyalty (top-k token overlap)."""
    return lm.model.get_output_embeddings()(hidden).float()
