"""Triton kernels for the four BN primitives (DESIGN §4); launchers in primitives.py.

Notation: t is the tensor the norm slot sees, addressed as outer × inner × channel (see
_common.Geometry), M = outer·inner elements per channel, c a channel. relu_mode 0 is norm(t),
1 relu(norm(t)) (conv-bn-relu), 2 norm(relu(t)) (conv-relu-bn); t_in is what the norm
normalizes: t, or relu(t) for mode 2.

stats — numerically stable two-level moments of shifted data, deterministic (no atomics):

    level 1, one program per (outer, split, channel block), looping over its inner tiles:
        pivot K_p = the program's first value of each channel; u = t_in − K_p
        per tile b:   n_b = #valid,  m_b = Σ u / n_b,  M2_b = Σ (u − m_b)²   (exact: the
                      tile is in registers, so the centered pass costs no memory traffic)
        Chan merge into the running (n, m, M2):
                      δ = m_b − m,  n' = n + n_b,  m' = m + δ·n_b/n',
                      M2' = M2 + M2_b + δ²·n·n_b/n'
        writes one row (n, K, m, M2) per program into (P, C) partial buffers
    level 2, one program per channel block, a fixed-order pass over the P rows, relative to
    row 0's pivot:
        d_p = (K_p − K_0) + m_p,   μ = Σ n_p·d_p / Σ n_p
        mean = K_0 + μ,            var = (Σ M2_p + Σ n_p·(d_p − μ)²) / Σ n_p

    No E[t²] − E[t]² anywhere, and the shift keeps the per-chunk means small, so that their
    float32 rounding does not pollute the between-chunk term: data with mean 1e4 and std 1
    keeps its float32 digits (plain per-chunk means of 1e4 lose ~1e-4 of the variance).

apply — one read, one write, the norm centered (fused/_norm.py says why):

    out = act((t_in − mean_c)·scale_c + shift_c)      (act = ReLU for mode 1)

    For bn scale = gamma·rstd, shift = beta; bn-minus scale = rstd, shift = 0; affine
    scale = gamma, shift = beta, mean = 0. t_in − mean is exact for t near the mean, so data
    far from zero (mean 1e4, std 1) keeps no per-channel offset from a rounded
    beta − mean·scale. The mean is the one rounded to the accumulation dtype (primitives.py).

backward_reduce — with g' = g·[(t − mean_c)·scale_c + shift_c > 0] for mode 1 (the forward's
pre-activation, computed by the same expression as apply so that the mask is bit-identical
to the ReLU the forward applied), else g:

    sum_g_c = Σ g'        sum_g_tc_c = Σ g'·(t_in − mean_c)
    same two levels as stats (per-program partial sums, then a fixed-order sum over P rows)

backward_apply — per-channel k1, k2, k3 from fused/_norm.py (training: k1 = s,
k2 = −s·rstd²·sum_g_tc/M, k3 = −s·sum_g/M; eval/affine: k2 = k3 = 0):

    dt = g'·k1 + (t_in − mean)·k2 + k3,   times [t > 0] for mode 2

Centering before scaling keeps dt exact far from zero. Activations load in their dtype and
compute in float32 (float64 for float64 activations: the accumulation type is the element
type of the per-channel pointers); outputs store in the activation dtype.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import interpreting

# The interpreter (triton 3.8) truncates float32 -> bfloat16; GPUs round to nearest even.
# Rounding by hand first makes the interpreter give the GPU's result.
_ROUND_BF16 = tl.constexpr(interpreting())


@triton.jit
def cast_to(v, dtype: tl.constexpr):
    if _ROUND_BF16 and dtype == tl.bfloat16:
        u = v.to(tl.float32).to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        v = (u & 0xFFFF0000).to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def relu_keep_nan(v):
    # torch.relu keeps NaN; NaN < 0 is false, so NaN passes through.
    return tl.where(v < 0, 0.0, v)


@triton.jit
def pre_activation(t_in, mean, scale, shift):
    """(t_in − mean)·scale + shift: the norm, centered. apply and the ReLU-after mask of the
    backward both evaluate it here, so that the mask is exactly the forward's ReLU."""
    return (t_in - mean) * scale + shift


@triton.jit
def grad_and_input(g, t, mean, scale, shift, RELU_MODE: tl.constexpr):
    """(g', t_in): the gradient at the norm's output and the value the norm saw."""
    if RELU_MODE == 1:
        g = tl.where(pre_activation(t, mean, scale, shift) > 0, g, 0.0)
    if RELU_MODE == 2:
        t = relu_keep_nan(t)
    return g, t


@triton.jit
def grad_of_input(g, t, mean, scale, shift, k1, k2, k3, RELU_MODE: tl.constexpr):
    """dt = mask·(g'·k1 + (t_in − mean)·k2 + k3): backward_apply on values in registers."""
    gm, t_in = grad_and_input(g, t, mean, scale, shift, RELU_MODE)
    dt = gm * k1 + (t_in - mean) * k2 + k3
    if RELU_MODE == 2:
        dt = tl.where(t > 0, dt, 0.0)
    return dt


@triton.jit
def tile_moments(v, mask):
    """Per-column (count, mean, M2) of the valid entries of a tile in registers."""
    n = tl.sum(mask.to(v.dtype), axis=0)
    mean = tl.sum(tl.where(mask, v, 0.0), axis=0) / tl.maximum(n, 1.0)
    d = tl.where(mask, v - mean[None, :], 0.0)
    return n, mean, tl.sum(d * d, axis=0)


@triton.jit
def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    n = n_a + n_b
    w = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * w, m2_a + m2_b + delta * delta * n_a * w


@triton.jit
def _tile_offsets(split, tile, tiles_per_split, s_inner, c, s_channel, inner,
                  c_mask, BLOCK_I: tl.constexpr):
    i = (split * tiles_per_split + tile) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs = i.to(tl.int64)[:, None] * s_inner + c[None, :] * s_channel
    return offs, (i < inner)[:, None] & c_mask[None, :]


@triton.jit
def _program_channels(splits, C, BLOCK_C: tl.constexpr):
    """(pid, outer, split, channels, channel mask) of this program."""
    pid = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return pid, pid // splits, pid % splits, c, c < C


@triton.jit
def _elementwise_tile(splits, inner, C, s_outer, s_inner, s_channel, BLOCK_I: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """(offsets, mask, channels, channel mask) of an element-wise program's one tile."""
    _, outer, split, c, c_mask = _program_channels(splits, C, BLOCK_C)
    offs, mask = _tile_offsets(split, 0, 1, s_inner, c, s_channel, inner, c_mask, BLOCK_I)
    return offs + outer.to(tl.int64) * s_outer, mask, c, c_mask


@triton.jit
def stats_partial_kernel(
        t_ptr,                        # (outer, inner, C) activations through strides
        cnt_ptr, pivot_ptr, mean_ptr, m2_ptr,  # (P, C) partial count, pivot, shifted mean, M2
        inner, C, s_outer, s_inner, s_channel, splits, tiles_per_split,
        RELU_MODE: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr):
    pid, outer, split, c, c_mask = _program_channels(splits, C, BLOCK_C)
    acc = mean_ptr.dtype.element_ty
    base = t_ptr + outer.to(tl.int64) * s_outer
    first = (split * tiles_per_split * BLOCK_I).to(tl.int64) * s_inner  # always < inner
    pivot = tl.load(base + first + c * s_channel, mask=c_mask, other=0.0).to(acc)
    if RELU_MODE == 2:
        pivot = relu_keep_nan(pivot)
    n = tl.zeros([BLOCK_C], acc)
    mean = tl.zeros([BLOCK_C], acc)
    m2 = tl.zeros([BLOCK_C], acc)
    for tile in range(tiles_per_split):
        offs, mask = _tile_offsets(split, tile, tiles_per_split, s_inner, c, s_channel,
                                   inner, c_mask, BLOCK_I)
        v = tl.load(base + offs, mask=mask, other=0.0).to(acc)
        if RELU_MODE == 2:
            v = relu_keep_nan(v)
        n_b, mean_b, m2_b = tile_moments(v - pivot[None, :], mask)
        n, mean, m2 = chan_merge(n, mean, m2, n_b, mean_b, m2_b)
    out = pid * C + c
    tl.store(cnt_ptr + out, n, mask=c_mask)
    tl.store(pivot_ptr + out, pivot, mask=c_mask)
    tl.store(mean_ptr + out, mean, mask=c_mask)
    tl.store(m2_ptr + out, m2, mask=c_mask)


@triton.jit
def merge_moments_kernel(
        cnt_ptr, pivot_ptr, mean_ptr, m2_ptr,  # (P, C) partials (stats_partial_kernel, conv)
        out_mean_ptr, out_var_ptr,    # (C,) batch mean and biased variance
        P, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    acc = out_mean_ptr.dtype.element_ty
    ref = tl.load(pivot_ptr + c, mask=c_mask, other=0.0)
    total = tl.zeros([BLOCK_C], acc)
    weighted = tl.zeros([BLOCK_C], acc)
    for p0 in range(0, P, BLOCK_P):
        n_p, d_p, _ = _shifted_partials(cnt_ptr, pivot_ptr, mean_ptr, m2_ptr, ref, p0, P, c,
                                        c_mask, C, BLOCK_P)
        total += tl.sum(n_p, axis=0)
        weighted += tl.sum(n_p * d_p, axis=0)
    total = tl.where(c_mask, total, 1.0)  # channels past C: no 0/0
    mu = weighted / total
    m2 = tl.zeros([BLOCK_C], acc)
    for p0 in range(0, P, BLOCK_P):
        n_p, d_p, m2_p = _shifted_partials(cnt_ptr, pivot_ptr, mean_ptr, m2_ptr, ref, p0, P,
                                           c, c_mask, C, BLOCK_P)
        d = d_p - mu[None, :]
        m2 += tl.sum(m2_p + n_p * d * d, axis=0)
    tl.store(out_mean_ptr + c, ref + mu, mask=c_mask)
    tl.store(out_var_ptr + c, m2 / total, mask=c_mask)


@triton.jit
def _shifted_partials(cnt_ptr, pivot_ptr, mean_ptr, m2_ptr, ref, p0, P, c, c_mask, C,
                      BLOCK_P: tl.constexpr):
    """(n_p, d_p = (K_p − K_0) + m_p, M2_p) for partial rows p0 … p0 + BLOCK_P."""
    p = p0 + tl.arange(0, BLOCK_P)
    offs = p[:, None] * C + c[None, :]
    mask = (p < P)[:, None] & c_mask[None, :]
    n_p = tl.load(cnt_ptr + offs, mask=mask, other=0.0)
    d_p = ((tl.load(pivot_ptr + offs, mask=mask, other=0.0) - ref[None, :])
           + tl.load(mean_ptr + offs, mask=mask, other=0.0))
    return n_p, tl.where(mask, d_p, 0.0), tl.load(m2_ptr + offs, mask=mask, other=0.0)


@triton.jit
def sum_partials_kernel(
        a_ptr, b_ptr,                 # (P, C) partial sums
        out_a_ptr, out_b_ptr,         # (C,) their column sums, in a fixed order
        P, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    acc = out_a_ptr.dtype.element_ty
    sum_a = tl.zeros([BLOCK_C], acc)
    sum_b = tl.zeros([BLOCK_C], acc)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        offs = p[:, None] * C + c[None, :]
        mask = (p < P)[:, None] & c_mask[None, :]
        sum_a += tl.sum(tl.load(a_ptr + offs, mask=mask, other=0.0), axis=0)
        sum_b += tl.sum(tl.load(b_ptr + offs, mask=mask, other=0.0), axis=0)
    tl.store(out_a_ptr + c, sum_a, mask=c_mask)
    tl.store(out_b_ptr + c, sum_b, mask=c_mask)


@triton.jit
def apply_kernel(
        t_ptr, out_ptr,               # (outer, inner, C) activations, same strides
        mean_ptr, scale_ptr, shift_ptr,  # (C,) float32/float64
        inner, C, s_outer, s_inner, s_channel, splits,
        RELU_MODE: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr):
    offs, mask, c, c_mask = _elementwise_tile(splits, inner, C, s_outer, s_inner, s_channel,
                                              BLOCK_I, BLOCK_C)
    acc = scale_ptr.dtype.element_ty
    v = tl.load(t_ptr + offs, mask=mask, other=0.0).to(acc)
    if RELU_MODE == 2:
        v = relu_keep_nan(v)
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0)
    shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0)
    v = pre_activation(v, mean[None, :], scale[None, :], shift[None, :])
    if RELU_MODE == 1:
        v = relu_keep_nan(v)
    tl.store(out_ptr + offs, cast_to(v, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def backward_reduce_kernel(
        g_ptr, t_ptr,                 # (outer, inner, C) gradient and activations, same strides
        mean_ptr, scale_ptr, shift_ptr,  # (C,) float32/float64
        sum_g_ptr, sum_gtc_ptr,       # (P, C) partial Σg', Σg'·(t_in − mean)
        inner, C, s_outer, s_inner, s_channel, splits, tiles_per_split,
        RELU_MODE: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr):
    pid, outer, split, c, c_mask = _program_channels(splits, C, BLOCK_C)
    acc = mean_ptr.dtype.element_ty
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)[None, :]
    scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0)[None, :]
    shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0)[None, :]
    base = outer.to(tl.int64) * s_outer
    sum_g = tl.zeros([BLOCK_C], acc)
    sum_gtc = tl.zeros([BLOCK_C], acc)
    for tile in range(tiles_per_split):
        offs, mask = _tile_offsets(split, tile, tiles_per_split, s_inner, c, s_channel,
                                   inner, c_mask, BLOCK_I)
        g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(acc)
        t = tl.load(t_ptr + base + offs, mask=mask, other=0.0).to(acc)
        gm, t_in = grad_and_input(g, t, mean, scale, shift, RELU_MODE)
        sum_g += tl.sum(gm, axis=0)
        sum_gtc += tl.sum(tl.where(mask, gm * (t_in - mean), 0.0), axis=0)
    out = pid * C + c
    tl.store(sum_g_ptr + out, sum_g, mask=c_mask)
    tl.store(sum_gtc_ptr + out, sum_gtc, mask=c_mask)


@triton.jit
def backward_apply_kernel(
        g_ptr, t_ptr, dt_ptr,         # (outer, inner, C) gradient, activations, result
        mean_ptr, scale_ptr, shift_ptr, k1_ptr, k2_ptr, k3_ptr,  # (C,) float32/float64
        inner, C, s_outer, s_inner, s_channel, splits,
        RELU_MODE: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr):
    offs, mask, c, c_mask = _elementwise_tile(splits, inner, C, s_outer, s_inner, s_channel,
                                              BLOCK_I, BLOCK_C)
    acc = mean_ptr.dtype.element_ty
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(acc)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(acc)
    dt = grad_of_input(
        g, t, tl.load(mean_ptr + c, mask=c_mask, other=0.0)[None, :],
        tl.load(scale_ptr + c, mask=c_mask, other=0.0)[None, :],
        tl.load(shift_ptr + c, mask=c_mask, other=0.0)[None, :],
        tl.load(k1_ptr + c, mask=c_mask, other=0.0)[None, :],
        tl.load(k2_ptr + c, mask=c_mask, other=0.0)[None, :],
        tl.load(k3_ptr + c, mask=c_mask, other=0.0)[None, :], RELU_MODE)
    tl.store(dt_ptr + offs, cast_to(dt, dt_ptr.dtype.element_ty), mask=mask)
