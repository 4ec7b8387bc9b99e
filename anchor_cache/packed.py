"""Packed serving forward: a batch of requests of any tasks in one model forward, with no padding.

Each row is one request: its prefix (an anchor cache, re-encoded prefix ids, both, or nothing), its
query ids, its task's label words and, optionally, its own β. The batch runs as ONE sequence of
batch size 1:

    input_ids     (1, T)      row 0's prefix ids + query, row 1's prefix ids + query, ...
    position_ids  (1, T)      each row continues at its own prefix's first position
    cache         S slots     the batch's distinct anchor caches, one after another (a cache shared
                              by many rows appears once; one distinct cache is used as is, no copy)
    mask          (1, 1, T, S + T) bool: a token sees its own row's cache slots and, causally, its
                              own row's earlier tokens, nothing else
    key bias      (1, S + T) each cache's own logit offsets (a many-shot cache's log(1/G)), 0 on
                              tokens; absent when no cache has any

On CPU the fast path also gets `Blocks`: consecutive whole rows grouped into spans of at most
`block_tokens` tokens, so SDPA runs per span over the cache and the span's own keys instead of over
the whole T × (S + T) square the mask mostly forbids. One SDPA call over everything made a packed
SST-2 batch of 32 slower than the padded forward on CPU (attention took a quarter of it); spans of
32-128 tokens made it ~40% cheaper than padded. On an H100 one masked call was as fast as padded at
batch 64 but 1.37x slower at batch 256 (7,680 tokens: the mask's square grows with the batch), so
GPU spans are 1,024 tokens. A span reads only the cache slots of its own rows, so a batch of many
tasks does not make every span attend over every task's cache.

transformers returns a 4-D mask as is (`masking_utils._preprocess_mask_arguments` exits early for
any 4-D tensor), so it reaches the registered attention function unchanged and SDPA's fast path
runs with it. Re-weighting becomes one `Reweighting` whose entries each name their target (a row's
last token), key (packed cache slot or token) and class (into the rows' β concatenated along the
class axis), so rows with different β, label counts or none at all share the forward.

A packed row's result equals the row run alone (tests/test_packed.py) up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache

from anchor_cache.attention import AttentionPlan, Blocks, Reweighting
from anchor_cache.cache import AnchorCache, concat_dynamic_cache, key_bias_row
from anchor_cache.errors import ValidationError
from anchor_cache.forward import Prefix, label_logits
from anchor_cache.heads import FeatureLayers, Features, read_features
from anchor_cache.models import LoadedModel


class Head(Protocol):
    """Scores rows' features (the hidden states of its `layers`, and their label-word logits) as
    (N, C) class scores (heads.LinearHead, heads.KnnHead)."""

    layers: FeatureLayers

    def scores(self, features: Features) -> torch.Tensor: ...


# Query tokens per SDPA span on each device type; absent: one call over the whole sequence.
BLOCK_TOKENS = {"cpu": 64, "cuda": 1024}


@dataclass(frozen=True)
class PackedRow:
    """One request of a packed batch.

    reweighting: β (L, Hq, C_row) with `label_keys` relative to the row's own keys, i.e. the
        row's cache slots first, then its prefix ids and query tokens (exactly the key index the
        row would have in a padded `last_hidden` forward), `label_classes` < C_row and no
        `label_targets`; None runs the row unweighted.
    """

    prefix: Prefix
    ids: tuple[int, ...]
    label_ids: tuple[int, ...]
    reweighting: Reweighting | None = None
    head: Head | None = None  # scores the row's hidden state instead of its label words (heads.py)

    @property
    def num_tokens(self) -> int:
        """Tokens this row adds to the packed sequence."""
        return len(self.prefix.ids) + len(self.ids)


@dataclass(frozen=True)
class PackedBatch:
    """The tensors of one packed forward; `last` indexes each row's last token in the sequence."""

    input_ids: torch.Tensor  # (1, T)
    position_ids: torch.Tensor  # (1, T)
    attention_mask: torch.Tensor  # (1, 1, T, S + T) bool: True = may attend
    cache: DynamicCache | None  # S slots, batch 1; None when no row has a cache
    first: torch.Tensor  # (B,) each row's first token in the sequence
    last: torch.Tensor  # (B,)
    reweighting: Reweighting | None  # every re-weighted row's entries, targets = `targets` order
    targets: torch.Tensor | None  # (1, R) last token of each re-weighted row
    blocks: Blocks | None  # spans of whole rows for the fast path; None: one SDPA call
    key_bias: torch.Tensor | None  # (1, S + T) the caches' key biases (many_shot.py); None: none


def _spans(lengths: Sequence[int], row_slots: Sequence[range], block_tokens: int | None, cached: int,
           device: torch.device) -> Blocks | None:
    """Consecutive whole rows grouped greedily into spans of at most `block_tokens` tokens (a longer
    row alone), each with the cache slots its rows use; None when that leaves a single span."""
    if block_tokens is None:
        return None
    spans, slots, start, end, used = [], [], 0, 0, set()
    for n, row in zip(lengths, row_slots, strict=True):
        if end > start and end + n - start > block_tokens:
            spans.append((start, end))
            slots.append(sorted(used))
            start, used = end, set()
        end += n
        used.update(row)
    spans.append((start, end))
    slots.append(sorted(used))
    return Blocks.build(tuple(spans), slots, cached, device) if len(spans) > 1 else None


def pack(lm: LoadedModel, rows: Sequence[PackedRow], block_tokens: int | str | None = "auto") -> PackedBatch:
    """Lay `rows` out as one sequence; see the module docstring. `block_tokens`: span size for the
    fast path ("auto": BLOCK_TOKENS of the model's device type; None: no spans)."""
    if block_tokens == "auto":
        block_tokens = BLOCK_TOKENS.get(lm.device.type)
    device, limit = lm.device, lm.max_positions
    caches: dict[int, tuple[int, AnchorCache, int]] = {}  # id(cache) -> (distinct index, cache, first slot)
    slot_start: list[int] = []  # first packed cache slot of each row's cache
    cache_index: list[int] = []  # per row, its distinct cache (-1: none)
    slots_of: list[int] = []  # cache slots per row
    input_ids: list[int] = []
    positions: list[torch.Tensor] = []
    lengths: list[int] = []
    num_slots = 0
    for i, row in enumerate(rows):
        n = row.num_tokens
        if n == 0:
            raise ValidationError("cannot classify an empty token sequence")
        first = row.prefix.first_position
        if limit is not None and first + n > limit:
            raise ValidationError(
                f"prompt needs {first + n} positions but the model supports {limit}; shorten the input (row {i})"
            )
        cache = row.prefix.cache
        if cache is None:
            cache_index.append(-1)
            slot_start.append(0)
            slots_of.append(0)
        else:
            if id(cache) not in caches:
                caches[id(cache)] = (len(caches), cache, num_slots)
                num_slots += cache.num_tokens
            index, _, start = caches[id(cache)]
            cache_index.append(index)
            slot_start.append(start)
            slots_of.append(cache.num_tokens)
        input_ids += row.prefix.ids
        input_ids += row.ids
        positions.append(torch.arange(first, first + n))
        lengths.append(n)
    total = len(input_ids)
    lengths_t = torch.tensor(lengths, device=device)
    ends = torch.cumsum(lengths_t, 0)  # (B,) one past each row's last token
    row_of_token = torch.repeat_interleave(torch.arange(len(rows), device=device), lengths_t)  # (T,)
    cache_of_token = torch.tensor(cache_index, device=device)[row_of_token]
    cache_of_slot = torch.repeat_interleave(
        torch.arange(len(caches), device=device),
        torch.tensor([c.num_tokens for _, c, _ in caches.values()], device=device, dtype=torch.long),
    )  # (S,)
    sees_slot = cache_of_token[:, None] == cache_of_slot[None, :]  # (T, S); -1 matches no slot
    token = torch.arange(total, device=device)
    sees_token = (row_of_token[:, None] == row_of_token[None, :]) & (token[None, :] <= token[:, None])  # (T, T)
    mask = torch.cat([sees_slot, sees_token], dim=1)[None, None]
    distinct = [c for _, c, _ in caches.values()]
    reweighting, targets = _pack_reweighting(rows, slot_start, slots_of, ends - lengths_t, ends - 1, num_slots,
                                             device)
    return PackedBatch(
        input_ids=torch.tensor([input_ids], device=device),
        position_ids=torch.cat(positions).to(device)[None],
        attention_mask=mask,
        cache=concat_dynamic_cache(distinct, lm.model.config) if distinct else None,
        first=ends - lengths_t,
        last=ends - 1,
        reweighting=reweighting,
        targets=targets,
        blocks=_spans(lengths, [range(a, a + n) for a, n in zip(slot_start, slots_of, strict=True)], block_tokens,
                      num_slots, device),
        key_bias=key_bias_row(distinct, total),
    )


def _pack_reweighting(
    rows: Sequence[PackedRow], slot_start: list[int], slots_of: list[int], token_start: torch.Tensor,
    last: torch.Tensor, num_slots: int, device: torch.device,
) -> tuple[Reweighting | None, torch.Tensor | None]:
    """Every re-weighted row's (target, key, class) entries in packed coordinates, and the targets.

    Rows sharing one Reweighting object (a task's β) are translated together; rows sharing one β
    tensor share its columns of the concatenated β."""
    groups: dict[int, tuple[Reweighting, list[int]]] = {}
    for i, row in enumerate(rows):
        if row.reweighting is not None:
            if row.reweighting.label_targets is not None:
                raise ValueError("a packed row's re-weighting must not name targets")
            groups.setdefault(id(row.reweighting), (row.reweighting, []))[1].append(i)
    if not groups:
        return None, None
    reweighted = [i for _, members in groups.values() for i in members]
    target_of = {row: t for t, row in enumerate(reweighted)}
    betas: dict[int, tuple[int, torch.Tensor]] = {}  # id(beta) -> (first column, beta)
    columns = 0
    keys, classes, targets = [], [], []
    for rw, members in groups.values():
        if id(rw.beta) not in betas:
            betas[id(rw.beta)] = (columns, rw.beta)
            columns += rw.beta.shape[2]
        offset = betas[id(rw.beta)][0]
        index = torch.tensor(members, device=device)
        m = torch.tensor([slots_of[i] for i in members], device=device)[:, None]  # (G, 1)
        start = torch.tensor([slot_start[i] for i in members], device=device)[:, None]
        k = rw.label_keys.to(device)[None, :]  # (1, P): row-relative, cache slots first
        keys.append(torch.where(k < m, start + k, num_slots + token_start[index][:, None] + k - m).reshape(-1))
        classes.append((rw.label_classes.to(device) + offset).repeat(len(members)))
        targets.append(torch.tensor([target_of[i] for i in members], device=device).repeat_interleave(k.shape[1]))
    beta = [b for _, b in betas.values()]
    packed = Reweighting(
        beta=beta[0] if len(beta) == 1 else torch.cat(beta, dim=2),
        label_keys=torch.cat(keys),
        label_classes=torch.cat(classes),
        label_targets=torch.cat(targets),
    )
    return packed, last[torch.tensor(reweighted, device=device)][None]


def _forward(lm: LoadedModel, batch: PackedBatch, explicit: bool, all_layers: bool):
    plan = None
    if batch.reweighting is not None or batch.blocks is not None or batch.key_bias is not None or explicit:
        plan = AttentionPlan(reweighting=batch.reweighting, targets=batch.targets, explicit=explicit,
                             blocks=batch.blocks, key_bias=batch.key_bias)
    return lm.model.base_model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        cache=batch.cache,
        use_cache=batch.cache is not None,
        anchor_plan=plan,
        output_hidden_states=all_layers,
    )


def packed_hidden(
    lm: LoadedModel, rows: Sequence[PackedRow], explicit: bool = False, block_tokens: int | str | None = "auto"
) -> torch.Tensor:
    """(B, hidden) final-norm hidden state at each row's last token, from one packed forward.

    explicit: run the written-out reference attention (tests) instead of SDPA + correction.
    block_tokens: see `pack`."""
    batch = pack(lm, rows, block_tokens)
    return _forward(lm, batch, explicit, all_layers=False).last_hidden_state[0, batch.last]


def _layer_states(out) -> list[torch.Tensor]:
    """(T, H) per hidden-state index: the embeddings, each layer's output, the last one final-normed."""
    states = [h[0] for h in out.hidden_states]
    states[-1] = out.last_hidden_state[0]
    return states


def packed_features(
    lm: LoadedModel, rows: Sequence[PackedRow], layers: FeatureLayers, block_tokens: int | str | None = "auto"
) -> Features:
    """The rows' features for a head reading `layers` (rows of one task: their label words are alike),
    from one packed forward."""
    batch = pack(lm, rows, block_tokens)
    out = _forward(lm, batch, explicit=False, all_layers=True)
    final = out.last_hidden_state[0, batch.last]
    hidden = read_features(_layer_states(out), batch.first, batch.last, layers)
    return Features(hidden, label_logits(lm, final, rows[0].label_ids))


def packed_label_logits(
    lm: LoadedModel, rows: Sequence[PackedRow], explicit: bool = False, block_tokens: int | str | None = "auto"
) -> list[torch.Tensor]:
    """Per row, (C_row,) float32 logits of its own label words (or its head's scores), from one
    packed forward.

    Rows of one task share one (rows, C) matmul against the label rows of the LM head (and a head's
    matmul on their features); calibration is the caller's (ServedTask.scores)."""
    if not rows:
        return []
    batch = pack(lm, rows, block_tokens)
    out = _forward(lm, batch, explicit, all_layers=any(row.head is not None for row in rows))
    hidden = out.last_hidden_state[0, batch.last]
    groups: dict[tuple[tuple[int, ...], int], list[int]] = {}  # (label words, head) -> rows
    for i, row in enumerate(rows):
        groups.setdefault((tuple(row.label_ids), id(row.head)), []).append(i)
    states = _layer_states(out) if out.hidden_states is not None else None
    results: list[torch.Tensor | None] = [None] * len(rows)
    for (labels, _), members in groups.items():
        head = rows[members[0]].head
        index = torch.tensor(members, device=hidden.device)
        logits = label_logits(lm, hidden[index], labels)
        if head is not None:
            features = read_features(states, batch.first[index], batch.last[index], head.layers)
            logits = head.scores(Features(features, logits))
        for i, row_logits in zip(members, logits, strict=True):
            results[i] = row_logits
    return results
