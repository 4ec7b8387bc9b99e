"""Packed serving forward: a batch of requests of any tasks in one model forward, with no padding.

Each row is one request: its prefix (an anchor cache, re-encoded prefix ids, both, or nothing), its
query ids, its task's label words and, optionally, its own β. The batch runs as ONE sequence of
batch size 1:

    input_ids     (1, T)      row 0's prefix ids + query, row 1's prefix ids + query, ...
    position_ids  (1, T)      each row continues at its own prefix's first position
    cache         S slots     the batch's distinct anchor caches, one after another (a cache shared
                              by many rows appears once; one distinct cache is used as is, no copy)
    mask          Segments    a token sees its own row's cache slots and, causally, its own row's
                              earlier tokens, nothing else: per token its row and its row's cache,
                              per cache slot its cache, from which any piece of the mask is computed
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

Each span's mask is computed from the segments, so with spans the whole mask, which grows with
the square of the batch, is never written out (bench/pack.py times `pack`). The dense
`attention_mask` (1, 1, T, S + T) is built only when it is small, a single span of at most
block_tokens × (S + block_tokens), or when asked for: without spans, and for the written-out
reference path, which reads it.

transformers returns a 4-D mask as is (`masking_utils._preprocess_mask_arguments` exits early for
any 4-D tensor), so it reaches the registered attention function unchanged and SDPA's fast path
runs with it; with spans it still needs one, and gets a placeholder of that shape that nothing
reads. Re-weighting becomes one `Reweighting` whose entries each name their target (a row's
last token), key (packed cache slot or token) and class (into the rows' β concatenated along the
class axis), so rows with different β, label counts or none at all share the forward.

A packed row's result equals the row run alone (tests/test_packed.py) up to float rounding.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from transformers import DynamicCache

from anchor_cache.attention import AttentionPlan, Blocks, Reweighting, Segments
from anchor_cache.cache import AnchorCache, concat_dynamic_cache, key_bias_row
from anchor_cache.errors import ValidationError
from anchor_cache.forward import Prefix, label_logits, to_device
from anchor_cache.heads import FeatureLayers, Features, read_features
from anchor_cache.models import LoadedModel

if TYPE_CHECKING:  # graphs.py builds on this module
    from anchor_cache.graphs import PackedGraphs


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
    # (1, 1, T, S + T) bool, True = may attend; with `blocks`, an all-False placeholder that nothing reads
    attention_mask: torch.Tensor
    cache: DynamicCache | None  # S slots, batch 1; None when no row has a cache
    first: torch.Tensor  # (B,) each row's first token in the sequence
    last: torch.Tensor  # (B,)
    reweighting: Reweighting | None  # every re-weighted row's entries, targets = `targets` order
    targets: torch.Tensor | None  # (1, R) last token of each re-weighted row
    blocks: Blocks | None  # spans of whole rows for the fast path, with their masks; None: one SDPA call
    key_bias: torch.Tensor | None  # (1, S + T) the caches' key biases (many_shot.py); None: none
    # With blocks and re-weighting: the longest row, the window every target's softmax is taken over
    # (AttentionPlan.target_window), and the most entries of one target (AttentionPlan.target_entries).
    target_window: int | None = None
    target_entries: int = 0


def _spans(lengths: Sequence[int], row_cache: Sequence[int], cache_slots: Sequence[range],
           block_tokens: int | None) -> tuple[tuple[tuple[int, int], ...], list[list[int]]]:
    """Consecutive whole rows grouped greedily into spans of at most `block_tokens` tokens (a longer
    row alone; None: one span), each with the cache slots its rows use (`cache_slots[c]` of cache c)."""
    spans, used, start, end, caches = [], [], 0, 0, set()
    for n, c in zip(lengths, row_cache, strict=True):
        if block_tokens is not None and end > start and end + n - start > block_tokens:
            spans.append((start, end))
            used.append(caches)
            start, caches = end, set()
        end += n
        if c >= 0:
            caches.add(c)
    spans.append((start, end))
    used.append(caches)
    return tuple(spans), [[slot for c in sorted(cs) for slot in cache_slots[c]] for cs in used]


@dataclass(frozen=True)
class Layout:
    """Rows laid out one after another, before any tensor is made (pack's and graphs.py's shared
    first step): the token ids and positions, each row's length and distinct cache. The derived
    numbers are computed once per batch, on first use."""

    input_ids: list[int]
    positions: list[int]
    lengths: list[int]
    row_cache: list[int]  # per row, its index in `caches`; -1: none
    caches: list[AnchorCache]  # the distinct caches, in order of first use

    @classmethod
    def of(cls, lm: LoadedModel, rows: Sequence[PackedRow]) -> Layout:
        limit = lm.max_positions
        index: dict[int, int] = {}  # id(cache) -> its index among the distinct caches
        layout = cls([], [], [], [], [])
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
            if cache is not None and id(cache) not in index:
                index[id(cache)] = len(layout.caches)
                layout.caches.append(cache)
            layout.row_cache.append(-1 if cache is None else index[id(cache)])
            layout.input_ids.extend(row.prefix.ids)
            layout.input_ids.extend(row.ids)
            layout.positions.extend(range(first, first + n))
            layout.lengths.append(n)
        return layout

    @cached_property
    def cache_slots(self) -> list[range]:
        """Each distinct cache's slots among the caches laid out one after another."""
        bounds = list(itertools.accumulate((c.num_tokens for c in self.caches), initial=0))
        return [range(a, b) for a, b in itertools.pairwise(bounds)]

    @cached_property
    def num_slots(self) -> int:
        return sum(c.num_tokens for c in self.caches)

    @cached_property
    def starts(self) -> list[int]:
        return list(itertools.accumulate(self.lengths[:-1], initial=0))

    @cached_property
    def ends(self) -> list[int]:
        return list(itertools.accumulate(self.lengths))

    def row_slots(self) -> list[range]:
        """Each row's cache slots (empty for a row without a cache)."""
        slots = self.cache_slots
        return [slots[c] if c >= 0 else range(0) for c in self.row_cache]


def pack(lm: LoadedModel, rows: Sequence[PackedRow], block_tokens: int | str | None = "auto") -> PackedBatch:
    """Lay `rows` out as one sequence; see the module docstring. `block_tokens`: span size for the
    fast path ("auto": BLOCK_TOKENS of the model's device type; None: no spans, the dense mask)."""
    if block_tokens == "auto":
        block_tokens = BLOCK_TOKENS.get(lm.device.type)
    device = lm.device
    layout = Layout.of(lm, rows)
    # Indices are built on the CPU and copied to the device once each; masks are computed there from them.
    # Lists go through numpy: torch.tensor reads a list of 7,659 ids in ~0.9 ms, numpy in ~0.1.
    num_slots, total = layout.num_slots, len(layout.input_ids)
    segments = Segments.build(layout.lengths, layout.row_cache, [c.num_tokens for c in layout.caches], device)
    spans, span_slots = _spans(layout.lengths, layout.row_cache, layout.cache_slots, block_tokens)
    blocks = Blocks.build(spans, span_slots, segments) if len(spans) > 1 else None
    if blocks is None:
        mask = segments.allowed(torch.arange(total, device=device), torch.arange(num_slots + total, device=device))
        mask = mask[None, None]
    else:  # all False, so a path that read it by mistake would not look right
        mask = torch.zeros(1, 1, 1, 1, dtype=torch.bool, device=device).expand(1, 1, total, num_slots + total)
    starts, ends = layout.starts, layout.ends
    first, last = to_device(np.array([starts, [end - 1 for end in ends]], dtype=np.int64), device)  # (B,) each
    reweighting, targets = pack_reweighting(rows, layout, num_slots, device)
    windowed = blocks is not None and reweighting is not None
    distinct = layout.caches
    return PackedBatch(
        input_ids=to_device(np.array([layout.input_ids], dtype=np.int64), device),
        position_ids=to_device(np.array([layout.positions], dtype=np.int64), device),
        attention_mask=mask,
        cache=concat_dynamic_cache(distinct, lm.model.config) if distinct else None,
        first=first,
        last=last,
        reweighting=reweighting,
        targets=targets,
        blocks=blocks,
        key_bias=key_bias_row(distinct, total),
        target_window=max(layout.lengths) if windowed else None,
        target_entries=entries_block(rows) if windowed else 0,
    )


def entries_block(rows: Sequence[PackedRow]) -> int:
    """The most re-weighted entries of one target (its row's label keys), rounded up to a power of
    two, the fused kernel's block; 0 when no row is re-weighted."""
    most = max((row.reweighting.label_keys.shape[0] for row in rows if row.reweighting is not None), default=0)
    return 1 << (most - 1).bit_length() if most else 0


@dataclass(frozen=True)
class Entries:
    """Every re-weighted row's (target, key, class) entries in packed coordinates, on the host.

    Rows sharing one Reweighting object (a task's β) are translated together; rows sharing one β
    tensor share its columns of the concatenated β. Entries are sorted by target."""

    keys: np.ndarray  # (E,) packed key: cache slot, or num_slots + token
    classes: np.ndarray  # (E,) column of the concatenated β
    targets: np.ndarray  # (E,) index into `positions`
    positions: np.ndarray  # (R,) each re-weighted row's last token
    betas: list[torch.Tensor]  # the distinct β, in column order

    @classmethod
    def of(cls, rows: Sequence[PackedRow], layout: Layout, num_slots: int) -> Entries | None:
        """None when no row is re-weighted; `num_slots`: where tokens' keys start."""
        groups: dict[int, tuple[Reweighting, list[int]]] = {}
        for i, row in enumerate(rows):
            if row.reweighting is not None:
                if row.reweighting.label_targets is not None:
                    raise ValueError("a packed row's re-weighting must not name targets")
                groups.setdefault(id(row.reweighting), (row.reweighting, []))[1].append(i)
        if not groups:
            return None
        row_slots, starts, ends = layout.row_slots(), layout.starts, layout.ends
        betas: dict[int, tuple[int, torch.Tensor]] = {}  # id(beta) -> (first column, beta)
        columns, done = 0, 0
        keys, classes, targets, positions = [], [], [], []
        for rw, members in groups.values():
            if id(rw.beta) not in betas:
                betas[id(rw.beta)] = (columns, rw.beta)
                columns += rw.beta.shape[2]
            label_keys, label_classes = rw.host_labels
            k = label_keys[None, :]  # (1, P): row-relative, cache slots first
            cached = np.array([len(row_slots[i]) for i in members])[:, None]
            first_slot = np.array([row_slots[i].start for i in members])[:, None]
            first_key = np.array([num_slots + starts[i] for i in members])[:, None]
            keys.append(np.where(k < cached, first_slot + k, first_key + k - cached).reshape(-1))
            classes.append(np.tile(label_classes + betas[id(rw.beta)][0], len(members)))
            targets.append(np.repeat(np.arange(done, done + len(members)), k.shape[1]))
            positions.extend(ends[i] - 1 for i in members)
            done += len(members)
        return cls(np.concatenate(keys), np.concatenate(classes), np.concatenate(targets), np.array(positions),
                   [b for _, b in betas.values()])

    @property
    def beta(self) -> torch.Tensor:
        return self.betas[0] if len(self.betas) == 1 else torch.cat(self.betas, dim=2)


def pack_reweighting(rows: Sequence[PackedRow], layout: Layout, num_slots: int, device: torch.device
                     ) -> tuple[Reweighting | None, torch.Tensor | None]:
    """The rows' entries (`Entries`) as one Reweighting on the device, and its (1, R) targets."""
    entries = Entries.of(rows, layout, num_slots)
    if entries is None:
        return None, None
    index = torch.from_numpy(np.stack([entries.keys, entries.classes, entries.targets])).to(device)
    packed = Reweighting(beta=entries.beta, label_keys=index[0], label_classes=index[1], label_targets=index[2])
    return packed, torch.from_numpy(entries.positions[None]).to(device)


def _forward(lm: LoadedModel, batch: PackedBatch, explicit: bool, all_layers: bool):
    plan = None
    if batch.reweighting is not None or batch.blocks is not None or batch.key_bias is not None or explicit:
        plan = AttentionPlan(reweighting=batch.reweighting, targets=batch.targets, explicit=explicit,
                             blocks=batch.blocks, key_bias=batch.key_bias, target_window=batch.target_window,
                             target_entries=batch.target_entries)
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

    explicit: run the written-out reference attention (tests) instead of SDPA + correction; it
        reads the dense mask, so no spans. block_tokens: see `pack`."""
    batch = pack(lm, rows, None if explicit else block_tokens)
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
    lm: LoadedModel, rows: Sequence[PackedRow], explicit: bool = False, block_tokens: int | str | None = "auto",
    graphs: PackedGraphs | None = None,
) -> list[torch.Tensor]:
    """Per row, (C_row,) float32 logits of its own label words (or its head's scores), from one
    packed forward: replayed from `graphs` (graphs.py) when the rows have a static shape.

    Rows of one task share one (rows, C) matmul against the label rows of the LM head (and a head's
    matmul on their features); calibration is the caller's (ServedTask.scores)."""
    if not rows:
        return []
    hidden = graphs.last_hidden(rows) if graphs is not None and not explicit else None
    states = first = None
    if hidden is None:
        batch = pack(lm, rows, None if explicit else block_tokens)
        out = _forward(lm, batch, explicit, all_layers=any(row.head is not None for row in rows))
        hidden = out.last_hidden_state[0, batch.last]
        states = _layer_states(out) if out.hidden_states is not None else None
        first, last = batch.first, batch.last
    groups: dict[tuple[tuple[int, ...], int], list[int]] = {}  # (label words, head) -> rows
    for i, row in enumerate(rows):
        groups.setdefault((tuple(row.label_ids), id(row.head)), []).append(i)
    results: list[torch.Tensor | None] = [None] * len(rows)
    for (labels, _), members in groups.items():
        head = rows[members[0]].head
        index = to_device(members, hidden.device)
        logits = label_logits(lm, hidden[index], labels)
        if head is not None:  # never from graphs, which refuse heads
            features = read_features(states, first[index], last[index], head.layers)
            logits = head.scores(Features(features, logits))
        for i, row_logits in zip(members, logits, strict=True):
            results[i] = row_logits
    return results
