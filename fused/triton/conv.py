"""Launchers for the implicit-GEMM convolution kernels (conv_kernels.py) and the choice between
them and ATen's convolution.

Choosing the convolution: BNORDER_CONV_IMPL = auto (default) | triton | aten, read at every
call (so it also applies inside compiled graphs, where the ops are opaque custom ops).
It only matters where the Triton backend runs (CUDA tensors, or FUSED_BACKEND=triton).

    aten    ATen/cuDNN convolution + the Triton BN primitives (two extra BN passes forward)
    triton  the fused implicit-GEMM convolution (groups = 1 only; other convs use aten)
    auto    triton when groups = 1, the dtype is float16/bfloat16/float32, the kernel is
            1×1 or 3×3 and C_in·kH·kW ≤ AUTO_MAX_REDUCTION; aten otherwise.

Why that rule: the fused kernel saves whole activation passes (the stats pass, the dy
round trip), which is what dominates when the GEMM is short (small C_in·kH·kW, i.e. the
memory-bound early layers of CIFAR/ImageNet CNNs), while cuDNN's tuned GEMMs win once the
convolution is compute-bound. The threshold was *not* measured here (no GPU); a GPU user
measures it with `bnorder check --gpu --layer NAME` (its timing table sets the Triton
convolution, with and without its epilogue and prologue, against cuDNN's, and names which
conv_impl each unit ran), then sets BNORDER_CONV_IMPL or AUTO_MAX_REDUCTION.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import triton
from torch import Tensor

from . import _common, conv_kernels as K

CONV_IMPLS = ("auto", "triton", "aten")
AUTO_MAX_REDUCTION = 64 * 9


def requested() -> str:
    value = os.environ.get("BNORDER_CONV_IMPL", "auto").strip().lower() or "auto"
    if value not in CONV_IMPLS:
        raise ValueError(f"BNORDER_CONV_IMPL={value!r} is not one of {CONV_IMPLS}")
    return value


def supported(x: Tensor, weight: Tensor, groups: int) -> bool:
    return groups == 1 and x.dim() == 4 and x.dtype in (torch.float16, torch.bfloat16,
                                                         torch.float32, torch.float64)


def select(x: Tensor, weight: Tensor, groups: int) -> str:
    """"triton" or "aten" for this convolution (see the module docstring)."""
    choice = requested()
    if choice == "aten" or not supported(x, weight, groups):
        return "aten"
    if choice == "triton":
        return "triton"
    small_kernel = tuple(weight.shape[2:]) in ((1, 1), (3, 3))
    short = weight.shape[1] * weight.shape[2] * weight.shape[3] <= AUTO_MAX_REDUCTION
    return "triton" if (x.dtype != torch.float64 and small_kernel and short) else "aten"


# ---------------------------------------------------------------------------------------
# Launch parameters
# ---------------------------------------------------------------------------------------

def precision(dtype: torch.dtype, gpu: bool) -> str:
    """tl.dot's input_precision. float32 on a GPU follows torch.backends.cudnn.allow_tf32
    (True by default), as eager's cuDNN convolution does: TF32 products keep 10 of float32's
    23 mantissa bits, so each product is off by < 2^-9 relatively and a result by
    < 2^-9 · Σ|x||W| (tests/triton/test_gpu_launch.py checks that bound against float64).
    Interpreter-sized launches stay "ieee"; fp16/bf16 and float64 ignore it."""
    return "tf32" if gpu and dtype == torch.float32 and torch.backends.cudnn.allow_tf32 \
        else "ieee"


# Interpreter block caps: big, because each program instance costs milliseconds there
# (tests lower them to force many programs, K-loop iterations and split-K slices).
INTERPRETER_MAX_ROWS = 1024
INTERPRETER_MAX_CHANNELS = 128
GPU_MAX_ROWS = 64


# GPU reduction block (input channels forward, output channels for the input gradient, rows
# (n, p, q) for the weight gradient) and pipeline. Found with `python -m fused.triton.aot`:
# at 64 × 64 × 32 with 4 warps and 3 stages every float32/float64 variant and the float16
# NCHW ones spilled at 255 registers (up to 2.3 KB of spill stores), and the float64 weight
# gradient needed 225 KB of shared memory (over the A100's 163 KB). A K-block of 16 with
# 8 warps and 2 stages compiles without spills (float64: 1 stage, its tiles are twice as
# wide); the 64 × 64 output tile is kept, so each operand is still read once per tile.
GPU_MAX_K = 16


def _pipeline(dtype: torch.dtype, gpu: bool) -> Dict[str, int]:
    """num_warps / num_stages (and _common's compile options) of a GPU convolution launch
    (the interpreter takes none)."""
    if not gpu:
        return {}
    return dict(num_warps=8, num_stages=1 if dtype == torch.float64 else 2,
                **_common.gpu_compile_options(True))


def _block(n: int, gpu: bool, gpu_cap: int, interp_cap: int) -> int:
    """Power-of-two block ≥ 16 (tl.dot's minimum) covering n up to the cap."""
    return max(16, min(triton.next_power_of_2(max(n, 1)), gpu_cap if gpu else interp_cap))


def _rows_block(rows: int, gpu: bool) -> int:
    return _block(rows, gpu, GPU_MAX_ROWS, INTERPRETER_MAX_ROWS)


def _channels_block(channels: int, gpu: bool, gpu_cap: int) -> int:
    return _block(channels, gpu, gpu_cap, INTERPRETER_MAX_CHANNELS)


def wgrad_splits(rows: int, tiles: int, block_k: int, gpu: bool) -> int:
    """Slices of the weight gradient's reduction over (n, p, q): enough programs to fill a
    GPU, each slice still ≥ 8 K-blocks long; one slice in the interpreter."""
    if not gpu:
        return 1
    return max(1, min(triton.cdiv(_common.GPU_PROGRAMS // 2, tiles),
                      triton.cdiv(rows, 8 * block_k)))


@dataclass(frozen=True)
class Launch:
    """One kernel launch's parameters: `grid`, and `meta`, the keyword arguments that tune
    it (block sizes, dot precision), passed to the kernel as they are. The *_config
    functions below are the only place these are chosen; fused.triton.aot and the
    FUSED_TRITON_LAUNCH=gpu tests read the GPU's choice from them."""
    grid: Tuple[int, ...]
    meta: Dict[str, object]
    rows_per_split: int = 0  # weight gradient: rows (n, p, q) per split-K slice
    splits: int = 1          # weight gradient: split-K slices, summed afterwards


def _implicit_gemm_config(rows: int, out_channels: int, reduced_channels: int,
                          dtype: torch.dtype, gpu: bool) -> Launch:
    """Forward and input gradient are the same implicit GEMM: `rows` output positions by
    `out_channels`, reducing over `reduced_channels` (× the kernel taps)."""
    block_m = _rows_block(rows, gpu)
    block_n = _channels_block(out_channels, gpu, 64)
    return Launch((triton.cdiv(rows, block_m), triton.cdiv(out_channels, block_n)),
                  dict(PRECISION=precision(dtype, gpu), BLOCK_M=block_m, BLOCK_N=block_n,
                       BLOCK_K=_channels_block(reduced_channels, gpu, GPU_MAX_K),
                       **_pipeline(dtype, gpu)))


def forward_config(n: int, c: int, o: int, p: int, q: int, dtype: torch.dtype,
                   gpu: bool) -> Launch:
    """conv_fwd_kernel for x (n, c, ·, ·) → y (n, o, p, q)."""
    return _implicit_gemm_config(n * p * q, o, c, dtype, gpu)


def input_grad_config(n: int, c: int, h: int, w: int, o: int, dtype: torch.dtype,
                      gpu: bool) -> Launch:
    """conv_dgrad_kernel for dx (n, c, h, w) from a gradient with o channels."""
    return _implicit_gemm_config(n * h * w, c, o, dtype, gpu)


def weight_grad_config(n: int, c: int, o: int, r: int, s: int, p: int, q: int,
                       dtype: torch.dtype, gpu: bool) -> Launch:
    """conv_wgrad_kernel for dW (o, c, r, s) over a gradient (n, o, p, q)."""
    rows = n * p * q
    # float32 without tensor cores holds its products in registers: at 64 x 64 the dy
    # prologue's variant reached the 255-register cap and spilled 4 B on sm_90 (triton 3.8).
    fma_float32 = dtype == torch.float32 and precision(dtype, gpu) == "ieee"
    block_m = _channels_block(o, gpu, 64)
    block_n = _channels_block(c, gpu, 32 if fma_float32 else 64)
    block_k = _block(rows, gpu, GPU_MAX_K, INTERPRETER_MAX_ROWS)
    tiles = triton.cdiv(o, block_m) * triton.cdiv(c, block_n) * r * s
    split = wgrad_splits(rows, tiles, block_k, gpu)
    per_split = triton.cdiv(triton.cdiv(max(rows, 1), split), block_k) * block_k
    split = triton.cdiv(max(rows, 1), per_split)
    return Launch((triton.cdiv(o, block_m), triton.cdiv(c, block_n), r * s * split),
                  dict(PRECISION=precision(dtype, gpu), BLOCK_M=block_m, BLOCK_N=block_n,
                       BLOCK_K=block_k, **_pipeline(dtype, gpu)), rows_per_split=per_split,
                  splits=split)


def output_size(x: Tensor, weight: Tensor, stride, padding, dilation) -> Tuple[int, int]:
    return tuple((x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1)
                  - 1) // stride[i] + 1 for i in range(2))


def _geometry_args(stride, padding, dilation):
    return (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])


def _vector(v: Optional[Tensor], like: Tensor, acc: torch.dtype) -> Tensor:
    return v.to(acc).contiguous() if v is not None else like.new_empty(1, dtype=acc)


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------

def conv_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int], *,
                 in_scale: Optional[Tensor] = None, in_shift: Optional[Tensor] = None,
                 out_scale: Optional[Tensor] = None, out_shift: Optional[Tensor] = None,
                 relu: bool = False, stats_mode: int = 0):
    """y = [relu]([·s_o + b_o](conv(x̃, W) + bias)), x̃ = x·in_scale + in_shift if given.

    Returns (y, partial moments (cnt, pivot, mean, m2) of y or relu(y) for
    primitives.merge_moments, or None); y has x's memory format."""
    _common.check_runnable(x, "conv_forward")
    acc = _common.acc_dtype(x)
    n, c, h, w = x.shape
    o, _, r, s = weight.shape
    p, q = output_size(x, weight, stride, padding, dilation)
    y = torch.empty((n, o, p, q), dtype=x.dtype, device=x.device,
                    memory_format=_common.memory_format(x))
    _common.check_index_range("conv_forward", x, y)
    launch = forward_config(n, c, o, p, q, x.dtype, _common.gpu_launch(x))
    parts = [torch.empty((launch.grid[0], o) if stats_mode else (1,), dtype=acc,
                         device=x.device) for _ in range(4)]
    if y.numel():
        K.conv_fwd_kernel[launch.grid](
            x, weight, bias if bias is not None else parts[0],
            _vector(in_scale, x, acc), _vector(in_shift, x, acc),
            _vector(out_scale, x, acc), _vector(out_shift, x, acc), y, *parts,
            n, c, h, w, o, p, q, *x.stride(), *weight.stride(), *y.stride(),
            *_geometry_args(stride, padding, dilation), R=r, S=s, HAS_BIAS=bias is not None,
            NORM_INPUT=in_scale is not None, APPLY_OUT=out_scale is not None, RELU_OUT=relu,
            STATS=stats_mode, **launch.meta)
    return y, (tuple(parts) if stats_mode else None)


# ---------------------------------------------------------------------------------------
# Backward. `prologue` says how the kernels form the gradient ĝ on load:
#   0: ĝ = grad
#   1: ĝ = backward_apply(grad, y, mean, scale, shift, k1, k2, k3, relu_mode)  (y given)
#   2: ĝ = grad·[a > 0]                                                         (a given)
# ---------------------------------------------------------------------------------------

def _prologue_args(grad: Tensor, saved: Optional[Tensor], vectors: Optional[Sequence[Tensor]],
                   acc: torch.dtype):
    if saved is not None and saved.stride() != grad.stride():
        grad = grad.contiguous(memory_format=_common.memory_format(saved))
        saved = saved.contiguous(memory_format=_common.memory_format(saved))
    vec = (torch.stack([v.to(acc) for v in vectors]).contiguous() if vectors is not None
           else grad.new_empty(1, dtype=acc))
    return grad, saved if saved is not None else grad, vec


def conv_input_grad(grad: Tensor, weight: Tensor, x: Tensor, stride, padding, dilation, *,
                    prologue: int = 0, saved: Optional[Tensor] = None,
                    vectors: Optional[Sequence[Tensor]] = None, relu_mode: int = 0,
                    reduce_mean: Optional[Tensor] = None):
    """dx of conv(x, W) for gradient ĝ (see above), in x's memory format; with reduce_mean
    also (Σdx, Σdx·(x − reduce_mean)) per input channel, reduced in the epilogue."""
    acc = _common.acc_dtype(x)
    grad, saved, vec = _prologue_args(grad, saved, vectors, acc)
    n, c, h, w = x.shape
    o, _, r, s = weight.shape
    p, q = grad.shape[2:]
    dx = torch.empty_like(x, memory_format=_common.memory_format(x))
    _common.check_index_range("conv_input_grad", grad, x)
    launch = input_grad_config(n, c, h, w, o, x.dtype, _common.gpu_launch(x))
    reduce = reduce_mean is not None
    if reduce and x.stride() != dx.stride():
        x = x.contiguous(memory_format=_common.memory_format(x))
    sums = [torch.zeros((launch.grid[0], c) if reduce else (1,), dtype=acc, device=x.device)
            for _ in range(2)]
    if dx.numel():
        K.conv_dgrad_kernel[launch.grid](
            grad, saved, vec, weight, dx, x, _vector(reduce_mean, x, acc), *sums,
            n, c, h, w, o, p, q, *grad.stride(), *weight.stride(), *dx.stride(),
            *_geometry_args(stride, padding, dilation), R=r, S=s, PROLOGUE=prologue,
            RELU_MODE=relu_mode, REDUCE=reduce, **launch.meta)
    if not reduce:
        return dx, None
    from .primitives import sum_partials
    return dx, sum_partials(*sums)


def conv_weight_grad(grad: Tensor, x: Tensor, weight: Tensor, stride, padding, dilation, *,
                     prologue: int = 0, saved: Optional[Tensor] = None,
                     vectors: Optional[Sequence[Tensor]] = None, relu_mode: int = 0,
                     in_scale: Optional[Tensor] = None, in_shift: Optional[Tensor] = None
                     ) -> Tuple[Tensor, Tensor]:
    """(dW in weight's dtype, dbias in the accumulation dtype) of conv(x̃, W) for ĝ."""
    acc = _common.acc_dtype(x)
    grad, saved, vec = _prologue_args(grad, saved, vectors, acc)
    n, c, h, w = x.shape
    o, _, r, s = weight.shape
    p, q = grad.shape[2:]
    _common.check_index_range("conv_weight_grad", grad, x)
    launch = weight_grad_config(n, c, o, r, s, p, q, x.dtype, _common.gpu_launch(x))
    # Slices of the long reduction are summed in a fixed order below: deterministic.
    split = launch.splits
    dw = torch.zeros((split, o, c, r, s), dtype=acc, device=x.device)
    db = torch.zeros((split, o), dtype=acc, device=x.device)
    if n * p * q:
        K.conv_wgrad_kernel[launch.grid](
            grad, saved, vec, x, _vector(in_scale, x, acc), _vector(in_shift, x, acc), dw, db,
            n, c, h, w, o, p, q, launch.rows_per_split, *grad.stride(), *x.stride(),
            *_geometry_args(stride, padding, dilation), R=r, S=s, PROLOGUE=prologue,
            RELU_MODE=relu_mode, NORM_INPUT=in_scale is not None, **launch.meta)
    dw = dw.sum(0) if split > 1 else dw[0]
    db = db.sum(0) if split > 1 else db[0]
    return dw.to(weight.dtype).contiguous(memory_format=_common.memory_format(weight)), db
