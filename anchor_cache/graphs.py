"""CUDA graphs for the packed forward: a batch padded to a static shape, each shape captured once.

On an H100 the packed forward (packed.py) of SmolLM2-135M took 26 ms at batch 1 and 40 ms at
batch 256: the GPU waits on the Python that launches 30 layers' kernels one by one. A CUDA graph
replays all of them with one launch, but it needs the same shapes and the same addresses every
time. So a batch is padded up to a `Shape`, and each shape keeps static input buffers that are
written before each replay:

- tokens: the rows' tokens, then padding tokens up to a size on a grid of four per octave (so
  padding costs at most a quarter); the padding forms one more row, which sees only itself.
- spans: the sequence is cut into fixed spans of `span` tokens (the next power of two above the
  longest row, 64 at least; a short batch is one span), each span's queries seeing every cache
  slot and the 2·span tokens that end with its own, so a row that crosses into the next span still
  sees its earlier tokens; the mask inside is the eager path's, computed from the segments.
- slots: the distinct caches one after another, then padding slots of a cache no token has.
- re-weighting: the rows' entries, then entries on a padding token's target; β's classes padded
  with zeros. Each target's softmax is taken over its window only (`AttentionPlan.target_window`),
  and on CUDA the correction is one Triton kernel per layer (fused.py).

A batch whose shape has no graph yet runs the same static forward eagerly to capture one (a few
hundred ms once per shape, `MAX_GRAPHS` kept, all sharing one memory pool). Off CUDA the static
forward simply runs eagerly: tests/test_graphs.py checks on the CPU that it equals `pack`'s, and
on a GPU the graph replays that forward's kernels exactly.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from anchor_cache.attention import AttentionPlan, Blocks, Reweighting, Segments
from anchor_cache.cache import AnchorCache, dynamic_cache, key_bias_row
from anchor_cache.forward import to_device
from anchor_cache.models import LoadedModel
from anchor_cache.packed import Entries, Layout, PackedRow, entries_block

log = logging.getLogger(__name__)

GRID_STEPS = 4  # sizes per octave: padding adds at most 1/GRID_STEPS
MIN_SPAN = 64
MAX_SPAN = 1024  # a longer row runs eagerly: its span's attention would be too wide to pay
MAX_TOKENS = 65536
MAX_GRAPHS = 64
NO_CACHE = -3  # the cache of padding slots: no token's


def round_up(n: int, floor: int) -> int:
    """The smallest size >= n on a grid of GRID_STEPS sizes per octave, at least `floor`."""
    if n <= floor:
        return floor
    step = 1 << max(0, n.bit_length() - GRID_STEPS.bit_length())
    return -(-n // step) * step


@dataclass(frozen=True)
class Shape:
    """What a captured forward is fixed to; every batch that rounds up to it replays one graph."""

    tokens: int
    span: int  # query tokens per span; equal to `tokens`: one span
    slots: int  # cache slots; 0: no cache
    targets: int  # re-weighted targets; 0: no re-weighting
    entries: int
    per_target: int  # the most entries of one target: its rows' most label keys, a power of two
    classes: int
    beta_dtype: torch.dtype | None
    key_bias: bool

    @classmethod
    def of(cls, layout: Layout, rows: Sequence[PackedRow]) -> Shape | None:
        """The shape `rows` pad up to; None when they have none (a row longer than MAX_SPAN, too many tokens)."""
        span = max(MIN_SPAN, 1 << (max(layout.lengths) - 1).bit_length())
        tokens = round_up(len(layout.input_ids) + 1, MIN_SPAN)  # + 1: the padding row is never empty
        if span > MAX_SPAN or tokens > MAX_TOKENS:
            return None
        if tokens > span:
            tokens = -(-tokens // span) * span
        else:
            span = tokens
        weighted = [row.reweighting for row in rows if row.reweighting is not None]
        betas = {id(rw.beta): rw.beta for rw in weighted}
        return cls(
            tokens=tokens,
            span=span,
            slots=round_up(layout.num_slots, 16) if layout.num_slots else 0,
            targets=round_up(len(weighted) + 1, 8) if weighted else 0,  # + 1: padding entries' target
            entries=round_up(sum(rw.label_keys.shape[0] for rw in weighted), 16) if weighted else 0,
            per_target=entries_block(rows),
            classes=round_up(sum(b.shape[2] for b in betas.values()), 8) if weighted else 0,
            beta_dtype=next(iter(betas.values())).dtype if weighted else None,
            key_bias=any(c.key_bias is not None for c in layout.caches),
        )


class StaticForward:
    """One shape's input buffers and forward, and on CUDA its graph."""

    def __init__(self, lm: LoadedModel, shape: Shape, reference: AnchorCache | None, beta_shape: tuple[int, int]
                 ) -> None:
        self.lm, self.shape = lm, shape
        device, tokens, slots = lm.device, shape.tokens, shape.slots
        # the integer inputs, views of one buffer so that a batch's indices arrive in one copy
        sizes = [tokens] * 4 + [slots + tokens] * 2 + [shape.targets] + [shape.entries] * 3
        self._ints = torch.zeros(sum(sizes), dtype=torch.long, device=device)
        (self.input_ids, self.position_ids, self.query_row, self.query_cache, self.key_row, self.key_cache,
         self.targets, self.label_keys, self.label_classes, self.label_targets) = self._ints.split(sizes)
        self._reweighting_at = 4 * tokens + 2 * (slots + tokens)
        self.kv: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        if slots:
            for part, tensors in zip(self.kv, (reference.keys, reference.values), strict=True):
                part.extend(torch.zeros(1, t.shape[1], slots, t.shape[3], dtype=t.dtype, device=device)
                            for t in tensors)
        self._caches: tuple[AnchorCache, ...] = ()  # whose K/V the buffers hold now
        self.key_bias = torch.zeros(1, slots + tokens, device=device) if shape.key_bias else None
        self._betas: tuple[torch.Tensor, ...] = ()  # whose columns the β buffer holds now
        if shape.targets:
            layers, heads = beta_shape
            self.beta = torch.zeros(layers, heads, shape.classes, dtype=shape.beta_dtype, device=device)
        self._spans = self._span_indices()
        self.graph: torch.cuda.CUDAGraph | None = None
        self._output: torch.Tensor | None = None

    def _span_indices(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(n, L) queries, (n, S + 2L) keys and which keys are real (not before the sequence): fixed by the shape."""
        tokens, span, slots = self.shape.tokens, self.shape.span, self.shape.slots
        n = tokens // span
        queries = torch.arange(tokens).view(n, span)
        window = torch.arange(n)[:, None] * span - span + torch.arange(2 * span)[None]  # (n, 2L) token index
        keys = torch.cat([torch.arange(slots).expand(n, slots), slots + window.clamp(min=0)], dim=1)
        real = torch.cat([torch.ones(n, slots, dtype=torch.bool), window >= 0], dim=1)
        return tuple(t.to(self.lm.device) for t in (queries, keys, real))

    def fill(self, layout: Layout, rows: Sequence[PackedRow]) -> None:
        """Write a batch into the buffers (one copy for every index, K/V only when the caches changed)."""
        tokens, slots = self.shape.tokens, self.shape.slots
        real = len(layout.input_ids)
        # numpy builds these a few times faster than torch.tensor from lists (a batch-256 cost on the host)
        counts = np.array([*layout.lengths, tokens - real])
        query_row = np.repeat(np.arange(len(counts)), counts)
        slot_cache = np.full(slots, NO_CACHE)
        slot_cache[: layout.num_slots] = np.repeat(np.arange(len(layout.caches)), [c.num_tokens for c in layout.caches])
        ints = np.zeros(self._ints.shape[0], dtype=np.int64)
        ints[:real] = layout.input_ids
        ints[tokens : tokens + real] = layout.positions
        ints[2 * tokens : self._reweighting_at] = np.concatenate([
            query_row, np.repeat([*layout.row_cache, -1], counts), np.full(slots, -1), query_row, slot_cache,
            np.full(tokens, -2)])
        if self.shape.targets:
            self._fill_reweighting(layout, rows, ints[self._reweighting_at :])
        self._ints.copy_(to_device(ints, self.lm.device))
        if tuple(map(id, layout.caches)) != tuple(map(id, self._caches)):
            for cache, slots_of in zip(layout.caches, layout.cache_slots, strict=True):
                for buffers, tensors in zip(self.kv, (cache.keys, cache.values), strict=True):
                    for buffer, tensor in zip(buffers, tensors, strict=True):
                        buffer[:, :, slots_of.start : slots_of.stop].copy_(tensor)
            if self.key_bias is not None:
                # rounded as the attention rounds it (to the model's dtype), once here rather than per layer
                bias = key_bias_row(layout.caches, slots - layout.num_slots + tokens)
                self.key_bias.copy_(bias.to(self.lm.model.dtype))
            self._caches = tuple(layout.caches)

    def _fill_reweighting(self, layout: Layout, rows: Sequence[PackedRow], ints: np.ndarray) -> None:
        """The entries, padded with entries of a padding target on the last padding token, into `ints`
        (targets, keys, classes, entry targets); β's columns only when the rows' β changed."""
        shape = self.shape
        entries = Entries.of(rows, layout, shape.slots)
        count = len(entries.positions)
        padding_token = shape.tokens - 1  # in the padding row, so whatever lands there is dropped
        targets, keys, classes, entry_targets = np.split(ints, np.cumsum([shape.targets] + [shape.entries] * 2))
        for buffer, values, pad in ((targets, entries.positions, padding_token),
                                    (keys, entries.keys, shape.slots + padding_token), (classes, entries.classes, 0),
                                    (entry_targets, entries.targets, count)):
            buffer[: len(values)] = values
            buffer[len(values) :] = pad
        if tuple(map(id, entries.betas)) != tuple(map(id, self._betas)):
            beta = entries.beta
            self.beta[..., : beta.shape[2]].copy_(beta)
            self.beta[..., beta.shape[2] :].zero_()
            self._betas = tuple(entries.betas)

    def compute(self) -> torch.Tensor:
        """(T, hidden) final-norm hidden states of the whole padded sequence, from the buffers alone."""
        tokens, slots = self.shape.tokens, self.shape.slots
        segments = Segments(self.query_row, self.query_cache, self.key_row, self.key_cache)
        queries, keys, real = self._spans
        allowed = (segments.allowed(queries, keys) & real[:, None, :])[:, None]
        blocks = Blocks(spans=(), queries=queries, keys=keys, allowed=allowed, order=queries.reshape(-1),
                        segments=segments)
        mask = torch.zeros(1, 1, 1, 1, dtype=torch.bool, device=self.lm.device).expand(1, 1, tokens, slots + tokens)
        reweighting = None
        if self.shape.targets:
            reweighting = Reweighting(self.beta, self.label_keys, self.label_classes, self.label_targets)
        plan = AttentionPlan(reweighting=reweighting, targets=self.targets[None] if reweighting is not None else None,
                             blocks=blocks, key_bias=self.key_bias,
                             target_window=self.shape.span if reweighting is not None else None,
                             target_entries=self.shape.per_target)
        cache = dynamic_cache(*self.kv, self.lm.model.config) if slots else None
        out = self.lm.model.base_model(input_ids=self.input_ids[None], attention_mask=mask,
                                       position_ids=self.position_ids[None], cache=cache,
                                       use_cache=cache is not None, anchor_plan=plan)
        return out.last_hidden_state[0]

    def capture(self, pool: tuple[int, int]) -> None:
        """Record `compute` as a graph, after warm-up runs on a side stream (as torch.cuda.graphs asks)."""
        side, main = torch.cuda.Stream(self.lm.device), torch.cuda.current_stream(self.lm.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for _ in range(2):
                self.compute()
        main.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            self._output = self.compute()
        self.graph = graph

    def run(self) -> torch.Tensor:
        if self.graph is None:
            return self.compute()
        self.graph.replay()
        return self._output


class PackedGraphs:
    """Static forwards by shape; on CUDA each is captured as a graph on first use and replayed after."""

    def __init__(self, lm: LoadedModel, capture: bool | None = None, max_graphs: int = MAX_GRAPHS) -> None:
        self.lm = lm
        self.capture = lm.device.type == "cuda" if capture is None else capture
        self.max_graphs = max_graphs
        self._forwards: OrderedDict[Shape, StaticForward] = OrderedDict()  # least recently used first
        self._failed: set[Shape] = set()  # shapes whose capture failed run eagerly
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None

    @property
    def captured(self) -> int:
        return sum(f.graph is not None for f in self._forwards.values())

    @torch.inference_mode()
    def last_hidden(self, rows: Sequence[PackedRow]) -> torch.Tensor | None:
        """(B, hidden) as `packed_hidden` gives it, or None when the rows have no static shape (a head,
        which reads every layer, or a row longer than MAX_SPAN): the caller runs them eagerly."""
        if not rows or any(row.head is not None for row in rows):
            return None
        layout = Layout.of(self.lm, rows)
        shape = Shape.of(layout, rows)
        if shape is None:
            return None
        forward = self._forward(shape, layout, rows)
        forward.fill(layout, rows)
        if self.capture and forward.graph is None and shape not in self._failed:
            self._capture(forward)
        last = to_device([end - 1 for end in layout.ends], self.lm.device)
        return forward.run().index_select(0, last)

    def _forward(self, shape: Shape, layout: Layout, rows: Sequence[PackedRow]) -> StaticForward:
        forward = self._forwards.get(shape)
        if forward is None:
            beta = next((row.reweighting.beta for row in rows if row.reweighting is not None), None)
            forward = StaticForward(self.lm, shape, layout.caches[0] if layout.caches else None,
                                    tuple(beta.shape[:2]) if beta is not None else (0, 0))
            self._forwards[shape] = forward
            while len(self._forwards) > self.max_graphs:
                self._forwards.popitem(last=False)
        self._forwards.move_to_end(shape)
        return forward

    def _capture(self, forward: StaticForward) -> None:
        start = time.perf_counter()
        try:
            forward.capture(self._pool)
        except RuntimeError as error:  # e.g. another thread's GPU work broke the capture: run it eagerly
            self._failed.add(forward.shape)
            log.warning("could not capture a CUDA graph for %s, running it eagerly: %s", forward.shape, error)
            return
        log.info("captured a CUDA graph for %d tokens in %d-token spans (%d slots, %d targets) in %.0f ms; %d kept",
                 forward.shape.tokens, forward.shape.span, forward.shape.slots, forward.shape.targets,
                 1000 * (time.perf_counter() - start), self.captured)
