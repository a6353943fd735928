"""Implicit-GEMM convolution (groups = 1) with the BN work fused into its prologue and
epilogue; launchers in conv.py.

Shapes: x (N, C, H, W), weight (O, C, R, S), y (N, O, P, Q), P = (H + 2·ph − dh·(R−1) − 1)/sh + 1.
All tensors are addressed through their four strides, so NCHW and channels_last (and any
mix) share one kernel; nothing is im2col'ed in memory.

forward — GEMM rows m = (n, p, q) (M = N·P·Q), columns o, reduction k = (r, s, c):

    y[m, o] = Σ_{r,s} Σ_c  x̃[n, c, p·sh − ph + r·dh, q·sw − pw + s·dw] · W[o, c, r, s] + bias[o]

  loop over (r, s) statically, over c in BLOCK_K slices; x̃ is x, or with NORM_INPUT
  (bn-conv-relu) x·s_c + b_c computed on load and forced to 0 outside the image: zero
  padding in *normalized* space, exactly conv(norm(x)) — norm(x) is never stored.
  b_c is the affine form's shift, _norm.affine_shift(mean, s, shift) (ops.py says why the
  prologue and the epilogue do not center like the BN primitives).
  Epilogue on the [BLOCK_M, BLOCK_N] accumulator:
    APPLY_OUT   y·s_o + b_o (eval conv-bn-relu: the norm folded into the epilogue, b_o
                affine as in the prologue)
    RELU_OUT    max(·, 0)
    STATS 1/2   per-column (count, pivot, mean, M2) of the stored y / of relu(y), shifted by
                the tile's first row, written as one row of (M/BLOCK_M, O) partial buffers
                that primitives.merge_moments merges (Chan), so conv-bn-relu and
                conv-relu-bn need no separate stats pass.

input gradient — rows m = (n, h, w), columns c, reduction k = (r, s, o):

    dx[n, c, h, w] = Σ_{r,s,o} ĝ[n, o, p, q] · W[o, c, r, s]   where p = (h + ph − r·dh)/sh and
                     q = (w + pw − s·dw)/sw are integers inside the output (else the term is 0)

  ĝ is formed on load (PROLOGUE): 0 → g; 1 → the norm's backward_apply from g and y
  (dy is never stored; its ReLU mask [(y − mean)·s + shift > 0] is apply's own expression,
  norm_kernels.pre_activation); 2 → g·[a > 0] (the ReLU mask from the unit output a). Epilogue
  REDUCE (bn-conv-relu): per-column partial Σdx and Σdx·(x − mean_c) — the norm's
  backward_reduce done while dx is in registers.

weight gradient — per (r, s): rows o, columns c, reduction over j = (n, p, q), split in
SPLIT_K deterministic partial slices summed afterwards:

    dW[o, c, r, s] = Σ_j ĝ[n, o, p, q] · x̃[n, c, p·sh − ph + r·dh, q·sw − pw + s·dw]
    dbias[o]       = Σ_j ĝ[n, o, p, q]        (programs with c-block 0 and (r, s) = (0, 0))

  with the same ĝ prologue and the same x̃ normalization as the forward.

Accumulation is float32 (float64 for float64 tensors). The dot runs in the input dtype
(tensor cores for float16/bfloat16; float32 as TF32 when conv.precision says so, i.e. when
torch.backends.cudnn.allow_tf32 says eager would too). In the interpreter _mma reproduces
those products by hand (bfloat16 widened, TF32 truncated), see fused/triton/README.md.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import interpreting
from .norm_kernels import cast_to, grad_of_input, relu_keep_nan, tile_moments


@triton.jit
def _rows(start, stop, BLOCK: tl.constexpr, A, B):
    """Rows start … start + BLOCK of an (n, a, b) index space with A·B rows per image:
    (valid, n, a, b)."""
    m = start + tl.arange(0, BLOCK)
    return m < stop, m // (A * B), (m // B) % A, m % B


# The interpreter's tl.dot is numpy's matmul: it ignores input_precision and multiplies
# bfloat16 operands as the uint16 bit patterns it stores them in. When interpreting, _mma
# does what a GPU's tensor cores do by hand (float16 needs nothing: numpy widens it exactly).
_INTERPRETED = tl.constexpr(interpreting())


@triton.jit
def _tf32(v):
    # mma.tf32 reads only the top 19 bits of each float32 operand (Triton's PTX feeds it the
    # float32 registers without a cvt.rna.tf32): the low 13 mantissa bits are dropped.
    return (v.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a·b with products in the operands' dtype (tf32 for float32 when PRECISION says
    so) and sums in acc's dtype."""
    if _INTERPRETED:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if PRECISION == "tf32":
            a = _tf32(a)
            b = _tf32(b)
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)
    # out_dtype: triton 3.7 defaults it to float32 and rejects a float64 accumulator
    # that differs from it; 3.8 infers it from acc. Passing it serves both.
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def _grad_prologue(g_ptr, y_ptr, offs, mask, vec_ptr, o, o_mask, O,
                   PROLOGUE: tl.constexpr, RELU_MODE: tl.constexpr, AXIS: tl.constexpr):
    """ĝ on load. vec_ptr holds (mean, scale, shift, k1, k2, k3), each (O,), for PROLOGUE 1;
    AXIS is the tile axis that o runs along."""
    acc = vec_ptr.dtype.element_ty
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(acc)
    if PROLOGUE == 1:
        t = tl.load(y_ptr + offs, mask=mask, other=0.0).to(acc)
        v0 = tl.load(vec_ptr + o, mask=o_mask, other=0.0)
        v1 = tl.load(vec_ptr + O + o, mask=o_mask, other=0.0)
        v2 = tl.load(vec_ptr + 2 * O + o, mask=o_mask, other=0.0)
        v3 = tl.load(vec_ptr + 3 * O + o, mask=o_mask, other=0.0)
        v4 = tl.load(vec_ptr + 4 * O + o, mask=o_mask, other=0.0)
        v5 = tl.load(vec_ptr + 5 * O + o, mask=o_mask, other=0.0)
        if AXIS == 0:
            g = grad_of_input(g, t, v0[:, None], v1[:, None], v2[:, None], v3[:, None],
                              v4[:, None], v5[:, None], RELU_MODE)
        else:
            g = grad_of_input(g, t, v0[None, :], v1[None, :], v2[None, :], v3[None, :],
                              v4[None, :], v5[None, :], RELU_MODE)
        g = tl.where(mask, g, 0.0)
    if PROLOGUE == 2:
        a = tl.load(y_ptr + offs, mask=mask, other=0.0)
        g = tl.where(a > 0, g, 0.0)
    return g


@triton.jit
def _normalized_input(x_ptr, offs, mask, scale_ptr, shift_ptr, c, c_mask,
                      NORM_INPUT: tl.constexpr):
    """x̃ on load, [rows, c] tile: x, or x·s_c + b_c inside the image and 0 in the padding."""
    v = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if NORM_INPUT:
        s = tl.load(scale_ptr + c, mask=c_mask, other=0.0)
        b = tl.load(shift_ptr + c, mask=c_mask, other=0.0)
        v = cast_to(tl.where(mask, v.to(s.dtype) * s[None, :] + b[None, :], 0.0),
                    x_ptr.dtype.element_ty)
    return v


@triton.jit
def conv_fwd_kernel(
        x_ptr,                        # (N, C, H, W) input, any strides
        w_ptr,                        # (O, C, R, S) weight, any strides
        bias_ptr,                     # (O,) conv bias (HAS_BIAS)
        in_scale_ptr, in_shift_ptr,   # (C,) float32/64: x̃ = x·s + b (NORM_INPUT)
        out_scale_ptr, out_shift_ptr,  # (O,) float32/64: y·s + b (APPLY_OUT)
        y_ptr,                        # (N, O, P, Q) output, any strides
        cnt_ptr, pivot_ptr, mean_ptr, m2_ptr,  # (cdiv(M, BLOCK_M), O) partial moments (STATS)
        N, C, H, W, O, P, Q,
        sxn, sxc, sxh, sxw, swo, swc, swr, sws, syn, syo, syp, syq,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        R: tl.constexpr, S: tl.constexpr, HAS_BIAS: tl.constexpr, NORM_INPUT: tl.constexpr,
        APPLY_OUT: tl.constexpr, RELU_OUT: tl.constexpr, STATS: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    m_mask, n, p, q = _rows(pid_m * BLOCK_M, N * P * Q, BLOCK_M, P, Q)
    o = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_mask = o < O
    acc_ty = cnt_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], acc_ty)
    x_row = n.to(tl.int64) * sxn
    # A loop, not tl.static_range: unrolling 49 taps of a 7×7 kernel, each around a
    # pipelined K loop, took the compiler minutes per variant (fused.triton.aot).
    for rs in range(R * S):
        ih = p * stride_h - pad_h + (rs // S) * dil_h
        iw = q * stride_w - pad_w + (rs % S) * dil_w
        inside = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        pix = x_row + ih * sxh + iw * sxw
        for c0 in range(0, C, BLOCK_K):
            c = c0 + tl.arange(0, BLOCK_K)
            c_mask = c < C
            a = _normalized_input(x_ptr, pix[:, None] + c[None, :] * sxc,
                                  inside[:, None] & c_mask[None, :], in_scale_ptr,
                                  in_shift_ptr, c, c_mask, NORM_INPUT)
            b = tl.load(w_ptr + o[None, :] * swo + c[:, None] * swc + (rs // S) * swr
                        + (rs % S) * sws, mask=c_mask[:, None] & o_mask[None, :], other=0.0)
            acc = _mma(a, b, acc, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o, mask=o_mask, other=0.0).to(acc_ty)[None, :]
    if APPLY_OUT:
        acc = (acc * tl.load(out_scale_ptr + o, mask=o_mask, other=0.0)[None, :]
               + tl.load(out_shift_ptr + o, mask=o_mask, other=0.0)[None, :])
    if RELU_OUT:
        acc = relu_keep_nan(acc)
    valid = m_mask[:, None] & o_mask[None, :]
    y = cast_to(acc, y_ptr.dtype.element_ty)
    y_offs = (n.to(tl.int64) * syn + p * syp + q * syq)[:, None] + o[None, :] * syo
    tl.store(y_ptr + y_offs, y, mask=valid)
    if STATS > 0:
        v = y.to(acc_ty)  # statistics of y as stored, as the unfused path sees it
        if STATS == 2:
            v = relu_keep_nan(v)
        # shifted by the tile's first row (always valid), as in norm_kernels' stats
        pivot = tl.sum(tl.where((tl.arange(0, BLOCK_M) == 0)[:, None], v, 0.0), axis=0)
        n_b, mean_b, m2_b = tile_moments(v - pivot[None, :], valid)
        part = pid_m * O + o
        tl.store(cnt_ptr + part, n_b, mask=o_mask)
        tl.store(pivot_ptr + part, pivot, mask=o_mask)
        tl.store(mean_ptr + part, mean_b, mask=o_mask)
        tl.store(m2_ptr + part, m2_b, mask=o_mask)


@triton.jit
def conv_dgrad_kernel(
        g_ptr,                        # (N, O, P, Q) incoming gradient
        y_ptr,                        # (N, O, P, Q) y (PROLOGUE 1) or a (PROLOGUE 2), g's strides
        vec_ptr,                      # (6, O) float32/64 mean, scale, shift, k1, k2, k3
        w_ptr,                        # (O, C, R, S) weight, any strides
        dx_ptr,                       # (N, C, H, W) result
        x_ptr,                        # (N, C, H, W) input, dx's strides (REDUCE)
        red_mean_ptr,                 # (C,) float32/64 mean of x (REDUCE)
        sum_ptr, sum_tc_ptr,          # (cdiv(N·H·W, BLOCK_M), C) partial Σdx, Σdx·(x − mean)
        N, C, H, W, O, P, Q,
        sgn, sgo, sgp, sgq, swo, swc, swr, sws, sxn, sxc, sxh, sxw,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        R: tl.constexpr, S: tl.constexpr, PROLOGUE: tl.constexpr, RELU_MODE: tl.constexpr,
        REDUCE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    m_mask, n, h, w = _rows(pid_m * BLOCK_M, N * H * W, BLOCK_M, H, W)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = c < C
    acc_ty = vec_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], acc_ty)
    g_row = n.to(tl.int64) * sgn
    for rs in range(R * S):  # a loop, as in the forward
        hp = h + pad_h - (rs // S) * dil_h
        wp = w + pad_w - (rs % S) * dil_w
        p = tl.where(hp >= 0, hp, 0) // stride_h
        q = tl.where(wp >= 0, wp, 0) // stride_w
        hit = (m_mask & (hp >= 0) & (wp >= 0) & (hp % stride_h == 0) & (wp % stride_w == 0)
               & (p < P) & (q < Q))
        pix = g_row + p * sgp + q * sgq
        for o0 in range(0, O, BLOCK_K):
            o = o0 + tl.arange(0, BLOCK_K)
            o_mask = o < O
            g = _grad_prologue(g_ptr, y_ptr, pix[:, None] + o[None, :] * sgo,
                               hit[:, None] & o_mask[None, :], vec_ptr, o, o_mask, O,
                               PROLOGUE, RELU_MODE, 1)
            b = tl.load(w_ptr + o[:, None] * swo + c[None, :] * swc + (rs // S) * swr
                        + (rs % S) * sws, mask=o_mask[:, None] & c_mask[None, :], other=0.0)
            acc = _mma(cast_to(g, w_ptr.dtype.element_ty), b, acc, PRECISION)
    valid = m_mask[:, None] & c_mask[None, :]
    dx = cast_to(acc, dx_ptr.dtype.element_ty)
    x_offs = (n.to(tl.int64) * sxn + h * sxh + w * sxw)[:, None] + c[None, :] * sxc
    tl.store(dx_ptr + x_offs, dx, mask=valid)
    if REDUCE:
        v = tl.where(valid, dx.to(acc_ty), 0.0)
        xc = (tl.load(x_ptr + x_offs, mask=valid, other=0.0).to(acc_ty)
              - tl.load(red_mean_ptr + c, mask=c_mask, other=0.0)[None, :])
        part = pid_m * C + c
        tl.store(sum_ptr + part, tl.sum(v, axis=0), mask=c_mask)
        tl.store(sum_tc_ptr + part, tl.sum(v * xc, axis=0), mask=c_mask)


@triton.jit
def conv_wgrad_kernel(
        g_ptr,                        # (N, O, P, Q) incoming gradient
        y_ptr,                        # (N, O, P, Q) y (PROLOGUE 1) or a (PROLOGUE 2), g's strides
        vec_ptr,                      # (6, O) float32/64 mean, scale, shift, k1, k2, k3
        x_ptr,                        # (N, C, H, W) input, any strides
        in_scale_ptr, in_shift_ptr,   # (C,) float32/64: x̃ = x·s + b (NORM_INPUT)
        dw_ptr,                       # (SPLIT_K, O, C, R, S) float32/64 partial dW, contiguous
        db_ptr,                       # (SPLIT_K, O) float32/64 partial dbias
        N, C, H, W, O, P, Q, rows_per_split,
        sgn, sgo, sgp, sgq, sxn, sxc, sxh, sxw,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        R: tl.constexpr, S: tl.constexpr, PROLOGUE: tl.constexpr, RELU_MODE: tl.constexpr,
        NORM_INPUT: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    o = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_mask = o < O
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = c < C
    rs = tl.program_id(2) % (R * S)
    split = tl.program_id(2) // (R * S)
    r = rs // S
    s = rs % S
    acc_ty = vec_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], acc_ty)
    db = tl.zeros([BLOCK_M], acc_ty)
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, N * P * Q)
    for j0 in range(start, end, BLOCK_K):
        j_mask, n, p, q = _rows(j0, end, BLOCK_K, P, Q)
        g = _grad_prologue(g_ptr, y_ptr,
                           o[:, None] * sgo + (n.to(tl.int64) * sgn + p * sgp + q * sgq)[None, :],
                           o_mask[:, None] & j_mask[None, :], vec_ptr, o, o_mask, O,
                           PROLOGUE, RELU_MODE, 0)
        db += tl.sum(g, axis=1)
        ih = p * stride_h - pad_h + r * dil_h
        iw = q * stride_w - pad_w + s * dil_w
        inside = j_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xt = _normalized_input(
            x_ptr, (n.to(tl.int64) * sxn + ih * sxh + iw * sxw)[:, None] + c[None, :] * sxc,
            inside[:, None] & c_mask[None, :], in_scale_ptr, in_shift_ptr, c, c_mask,
            NORM_INPUT)
        acc = _mma(cast_to(g, x_ptr.dtype.element_ty), xt, acc, PRECISION)
    dw_offs = ((split * O + o[:, None]) * C + c[None, :]) * (R * S) + rs
    tl.store(dw_ptr + dw_offs, acc, mask=o_mask[:, None] & c_mask[None, :])
    tl.store(db_ptr + split * O + o, db, mask=o_mask & (pid_c == 0) & (rs == 0))
