"""The `triton` backend: the four BN primitives with fused/reference.py's signatures and
semantics (math and kernels in norm_kernels.py).

    stats(t, relu_mode) -> (mean, var)
    apply(t, mean, scale, shift, relu_mode) -> out        out = act((t_in − mean)·scale + shift)
    backward_reduce(g, t, mean, scale, shift, relu_mode) -> (sum_g, sum_g_tc)
    backward_apply(g, t, mean, scale, shift, k1, k2, k3, relu_mode) -> dt

Per-channel vectors are float32, or float64 for float64 activations: float64 runs entirely in
float64 in the kernels too (slow on consumer GPUs, exact everywhere), so the float64 test
battery checks the Triton algebra to ~1e-12. float16/bfloat16 activations load in their own
dtype and compute in float32. NCHW and channels_last; the gradient is brought to t's
memory format when it differs.

`mean` may also come as float64 for float32/float16/bfloat16 activations (the C++ backend
keeps the mean's float64 digits, and every backend's ops return their batch statistics as
float64, which the backward gets back): apply, backward_reduce and backward_apply round it
to the accumulation dtype before the launch. The Triton path normalizes with the mean as
rounded to float32 because its own statistics are float32 on a GPU anyway (stats_partial_kernel
and the conv epilogue accumulate in float32, ops.py widens them only to return them): a
float64 mean pointer would cost every kernel a second per-channel dtype for digits that
this path never computed. What the centered form (t − mean)·scale + shift is for (no
rounded beta − mean·scale offset on data far from zero, fused/_norm.py) holds with the
float32 mean too, and it is the form PyTorch's CUDA batch norm applies
(gamma·(x − mean)·invstd + beta), so the Triton passes round as eager does on a GPU.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
from torch import Tensor

from . import _common, norm_kernels as K

name = "triton"


def merge_blocks(c: int, gpu: bool) -> dict:
    """BLOCK_P (partial rows per step) and BLOCK_C (channels per program) of the (P, C)
    merge kernels, with a GPU launch's compile options. On a GPU 32 × 32: at 64 × 128
    three float64 partials need 255 registers per thread and spill, and triton 3.8 still
    spills a few bytes at 64 × 32 on sm_90 (fused.triton.aot); 32 × 32 compiles without.
    The interpreter keeps 64 × 128 (fewer, larger programs)."""
    return dict(BLOCK_P=32 if gpu else 64,
                BLOCK_C=min(triton.next_power_of_2(c), 32 if gpu else 128),
                **_common.gpu_compile_options(gpu))


def _check_vector(v: Tensor, what: str, t: Tensor, op: str) -> Tensor:
    """v, validated; the mean may be float64 too and is rounded to the accumulation dtype
    (the module docstring says why)."""
    c = t.shape[1]
    if not isinstance(v, Tensor) or v.dim() != 1 or v.shape[0] != c:
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"{op}: {what} must have shape ({c},), got {shape}")
    acc = _common.acc_dtype(t)
    if what == "mean" and v.dtype == torch.float64:
        v = v.to(acc)
    if v.dtype != acc:
        allowed = f"{acc} or torch.float64" if what == "mean" and acc != torch.float64 else acc
        raise ValueError(f"{op}: {what} must be {allowed} for {t.dtype} activations, got "
                         f"{v.dtype}")
    if v.device != t.device:
        raise RuntimeError(f"{op}: {what} is on {v.device} but the activations on {t.device}")
    return v


def _prepare(op: str, t: Tensor, relu_mode: int, vectors=(), g: Tensor | None = None):
    """Validate; returns (geometry, g in t's memory format, contiguous vectors)."""
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise ValueError(f"{op}: expected a floating-point tensor, got "
                         f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    if relu_mode not in (0, 1, 2):
        raise ValueError(f"{op}: relu_mode must be 0 (none), 1 (after) or 2 (before), got "
                         f"{relu_mode}")
    _common.check_runnable(t, op)
    geo = _common.geometry(t, op)
    if g is not None:
        if g.shape != t.shape:
            raise ValueError(f"{op}: gradient size {tuple(g.shape)} does not match input "
                             f"size {tuple(t.shape)}")
        if g.dtype != t.dtype:
            raise ValueError(f"{op}: gradient dtype {g.dtype} does not match input dtype "
                             f"{t.dtype}")
        if g.device != t.device:
            raise RuntimeError(f"{op}: gradient is on {g.device}, input on {t.device}")
        if g.stride() != t.stride():
            g = g.contiguous(memory_format=_common.memory_format(t))
            if g.stride() != t.stride():  # size-1 dimensions with odd strides
                g = g.as_strided(t.shape, t.stride()).copy_(g)
    vectors = tuple(_check_vector(v, what, t, op).contiguous() for what, v in vectors)
    return geo, g, vectors


def _strides(geo: _common.Geometry):
    return geo.inner, geo.channels, geo.s_outer, geo.s_inner, geo.s_channel


def merge_moments(cnt: Tensor, pivot: Tensor, mean: Tensor, m2: Tensor
                  ) -> Tuple[Tensor, Tensor]:
    """(mean, var) per channel from (P, C) partial moments of shifted data (also used by
    the conv epilogue)."""
    p, c = cnt.shape
    out_mean = torch.empty(c, dtype=mean.dtype, device=mean.device)
    out_var = torch.empty_like(out_mean)
    blocks = merge_blocks(c, _common.gpu_launch(cnt))
    K.merge_moments_kernel[(triton.cdiv(c, blocks["BLOCK_C"]),)](
        cnt, pivot, mean, m2, out_mean, out_var, p, c, **blocks)
    return out_mean, out_var


def sum_partials(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """Column sums of two (P, C) partial buffers, in a fixed order (deterministic)."""
    p, c = a.shape
    out_a = torch.empty(c, dtype=a.dtype, device=a.device)
    out_b = torch.empty_like(out_a)
    blocks = merge_blocks(c, _common.gpu_launch(a))
    K.sum_partials_kernel[(triton.cdiv(c, blocks["BLOCK_C"]),)](
        a, b, out_a, out_b, p, c, **blocks)
    return out_a, out_b


def stats(t: Tensor, relu_mode: int) -> Tuple[Tensor, Tensor]:
    geo, _, _ = _prepare("stats", t, relu_mode)
    acc = _common.acc_dtype(t)
    if t.numel() == 0:
        nan = torch.full((geo.channels,), float("nan"), dtype=acc, device=t.device)
        return nan, nan.clone()
    tiles = _common.tiling(geo, True, _common.gpu_launch(t), t.dtype)
    grid = tiles.grid(geo)
    parts = [torch.empty(grid[0], geo.channels, dtype=acc, device=t.device) for _ in range(4)]
    K.stats_partial_kernel[grid](t, *parts, *_strides(geo), tiles.splits,
                                 tiles.tiles_per_split, RELU_MODE=relu_mode,
                                 BLOCK_I=tiles.block_i, BLOCK_C=tiles.block_c,
                                 **tiles.options)
    return merge_moments(*parts)


def apply(t: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, relu_mode: int) -> Tensor:
    geo, _, (mean, scale, shift) = _prepare(
        "apply", t, relu_mode, (("mean", mean), ("scale", scale), ("shift", shift)))
    out = torch.empty_like(t)
    if t.numel():
        tiles = _common.tiling(geo, False, _common.gpu_launch(t), t.dtype)
        K.apply_kernel[tiles.grid(geo)](t, out, mean, scale, shift, *_strides(geo),
                                        tiles.splits, RELU_MODE=relu_mode,
                                        BLOCK_I=tiles.block_i, BLOCK_C=tiles.block_c,
                                        **tiles.options)
    return out


def backward_reduce(g: Tensor, t: Tensor, mean: Tensor, scale: Tensor, shift: Tensor,
                    relu_mode: int) -> Tuple[Tensor, Tensor]:
    geo, g, (mean, scale, shift) = _prepare(
        "backward_reduce", t, relu_mode, (("mean", mean), ("scale", scale), ("shift", shift)),
        g)
    acc = _common.acc_dtype(t)
    if t.numel() == 0:
        zeros = torch.zeros(geo.channels, dtype=acc, device=t.device)
        return zeros, zeros.clone()
    tiles = _common.tiling(geo, True, _common.gpu_launch(t), t.dtype)
    grid = tiles.grid(geo)
    part_g, part_gtc = (torch.empty(grid[0], geo.channels, dtype=acc, device=t.device)
                        for _ in range(2))
    K.backward_reduce_kernel[grid](g, t, mean, scale, shift, part_g, part_gtc,
                                   *_strides(geo), tiles.splits, tiles.tiles_per_split,
                                   RELU_MODE=relu_mode, BLOCK_I=tiles.block_i,
                                   BLOCK_C=tiles.block_c, **tiles.options)
    return sum_partials(part_g, part_gtc)


def backward_apply(g: Tensor, t: Tensor, mean: Tensor, scale: Tensor, shift: Tensor,
                   k1: Tensor, k2: Tensor, k3: Tensor, relu_mode: int) -> Tensor:
    geo, g, vectors = _prepare(
        "backward_apply", t, relu_mode,
        (("mean", mean), ("scale", scale), ("shift", shift), ("k1", k1), ("k2", k2),
         ("k3", k3)), g)
    dt = torch.empty_like(t)
    if t.numel():
        tiles = _common.tiling(geo, False, _common.gpu_launch(t), t.dtype)
        K.backward_apply_kernel[tiles.grid(geo)](g, t, dt, *vectors, *_strides(geo),
                                                 tiles.splits, RELU_MODE=relu_mode,
                                                 BLOCK_I=tiles.block_i,
                                                 BLOCK_C=tiles.block_c, **tiles.options)
    return dt
