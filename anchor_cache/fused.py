"""Anchor re-weighting's correction as one Triton kernel per layer (the GPU's fast path).

`attention.reweight_target_rows` adds Σ_i (exp(β) − 1)·A(q, p_i)·v_{p_i} to each re-weighted
target's SDPA output, and `window_row_weights` gets A from a softmax over the target's window of
keys. In torch that is about 25 small kernels per layer; on an H200 under CUDA graphs they made a
batch-1 forward 1.9× slower, because each kernel costs a few microseconds however little it does.
Here one program per (target, query head) streams the window's keys once for the softmax's max and
sum, then reads its own label keys as one block and adds the correction into the output row in
place.

Scores are accumulated in float32 from the model-dtype q and k, and the key bias is rounded to the
query's dtype first, as SDPA's additive mask rounds it. tests/test_fused.py checks the kernel
against the torch path in Triton's interpreter on the CPU; bench/gpu.py checks it on a GPU.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path serves
    triton = None

BLOCK_KEYS = 64


def available(query: torch.Tensor) -> bool:
    """Whether the kernel can run on this tensor's device."""
    return triton is not None and query.is_cuda


if triton is not None:

    @triton.jit
    def _correct(q_ptr, k_ptr, v_ptr, out_ptr, keys_ptr, allowed_ptr, targets_ptr, offsets_ptr, local_ptr,
                 class_ptr, scale_ptr, bias_ptr, sq_h, sq_t, sk_h, sk_t, sv_h, sv_t, so_t, so_h, ss_h, n_rep,
                 head_dim, sm_scale, width: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
        n = tl.program_id(0)
        h = tl.program_id(1)
        g = h // n_rep
        t = tl.load(targets_ptr + n)
        d = tl.arange(0, BLOCK_D)
        in_d = d < head_dim
        q = tl.load(q_ptr + h * sq_h + t * sq_t + d, mask=in_d, other=0.0).to(tl.float32)
        m = tl.full((), float("-inf"), tl.float32)
        total = tl.full((), 0.0, tl.float32)
        for start in range(0, width, BLOCK_K):  # the window's softmax: max, then the sum under it
            j = start + tl.arange(0, BLOCK_K)
            in_w = j < width
            key = tl.load(keys_ptr + n * width + j, mask=in_w, other=0)
            ok = (tl.load(allowed_ptr + n * width + j, mask=in_w, other=0) != 0) & in_w
            k = tl.load(k_ptr + g * sk_h + key[:, None] * sk_t + d[None, :], mask=ok[:, None] & in_d[None, :],
                        other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1) * sm_scale
            if HAS_BIAS:
                s += tl.load(bias_ptr + key, mask=ok, other=0.0)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))
            total = total * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
            m = m_new
        e = tl.load(offsets_ptr + n) + tl.arange(0, BLOCK_E)  # this target's label keys, all at once
        live = e < tl.load(offsets_ptr + n + 1)
        j = tl.load(local_ptr + e, mask=live, other=0)
        key = tl.load(keys_ptr + n * width + j, mask=live, other=0)
        live = live & (tl.load(allowed_ptr + n * width + j, mask=live, other=0) != 0)
        rows = live[:, None] & in_d[None, :]
        k = tl.load(k_ptr + g * sk_h + key[:, None] * sk_t + d[None, :], mask=rows, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1) * sm_scale
        if HAS_BIAS:
            s += tl.load(bias_ptr + key, mask=live, other=0.0)
        scale = tl.load(scale_ptr + h * ss_h + tl.load(class_ptr + e, mask=live, other=0), mask=live, other=0.0)
        weight = tl.where(live, tl.exp(s - m) / total * scale, 0.0)
        v = tl.load(v_ptr + g * sv_h + key[:, None] * sv_t + d[None, :], mask=rows, other=0.0).to(tl.float32)
        acc = tl.sum(weight[:, None] * v, axis=0)
        o = out_ptr + t * so_t + h * so_h + d
        tl.store(o, (tl.load(o, mask=in_d, other=0.0).to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=in_d)


def reweight_in_place(out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      keys: torch.Tensor, allowed: torch.Tensor, targets: torch.Tensor, offsets: torch.Tensor,
                      local: torch.Tensor, classes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                      scaling: float, most_entries: int) -> torch.Tensor:
    """Add each target's correction to `out` (1, T, Hq, D) in place and return it.

    query (1, Hq, T, D), key/value (1, Hkv, S + T, D); keys/allowed (N, K) each target's window
    (`AttentionPlan.window_keys`), targets (N,) its query index; entries sorted by target,
    `offsets` (N + 1,) where each target's start, `local` (E,) the entry's place in its window,
    `classes` (E,) its class, at most `most_entries` per target (a count the host knows: reading
    `offsets` would wait for the GPU); scale (Hq, C) exp(β) − 1 of this layer; bias (S + T,)
    float32 or None."""
    heads, kv_heads, head_dim = query.shape[1], key.shape[1], query.shape[3]
    n, width = keys.shape
    if n == 0:
        return out
    assert query.stride(3) == key.stride(3) == value.stride(3) == out.stride(3) == 1 and scale.stride(1) == 1
    grid = (n, heads)
    _correct[grid](query, key, value, out, keys, allowed, targets, offsets, local, classes, scale,
                   bias if bias is not None else scale, query.stride(1), query.stride(2), key.stride(1),
                   key.stride(2), value.stride(1), value.stride(2), out.stride(1), out.stride(2), scale.stride(0),
                   heads // kv_heads, head_dim, scaling, width=width, HAS_BIAS=bias is not None,
                   BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_K=BLOCK_KEYS,
                   BLOCK_E=triton.next_power_of_2(most_entries))
    return out
