"""What every Triton launcher needs: the interpreter check, the layout of an activation
tensor as strides, block sizes, and the float32/float64 accumulation type.

Layout. Every BN kernel sees an activation tensor as `outer × inner × channel` with three
strides, so one kernel serves both memory formats without a per-element division:

    NCHW (contiguous, H·W > 1)     outer = N, inner = H·W,  strides (C·H·W, 1, H·W)
    channels_last, or H = W = 1    outer = 1, inner = N·H·W, strides (0, C, 1)

A program owns a tile [BLOCK_I inner positions × BLOCK_C channels]; Triton's coalescing pass
vectorizes along whichever axis has stride 1.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

# Elements per tile. The interpreter costs ~1-4 ms per program instance whatever its size, so
# it gets tiles that cover the small test tensors in one or two programs; a GPU wants a few
# thousand elements per program and enough programs to fill the SMs. A GPU tile lives in
# registers: at 4 096 elements backward_apply (g, t and six per-channel vectors) spilled up
# to 6 KB per thread at 4 warps (python -m fused.triton.aot), so 2 048, halved for float64.
TILE_ELEMS_GPU = 2048
TILE_ELEMS_INTERPRETER = 1 << 16
GPU_PROGRAMS = 1024  # reductions: aim for this many partial tiles (≈ 8 per SM on an H100)

# ptxas, left to choose, holds some kernels well below 255 registers per thread and spills
# there instead: the full ahead-of-time sweep (python -m fused.triton.aot, 6 312 variants)
# found 131 spilling 2 B to 6 KB, many at 40-128 registers. Allowed 255 (.maxnreg), every
# variant compiles without a spill; the BN primitives then take at most 175 registers, the
# convolutions up to 255 (one block of 8 warps per SM). Whether that occupancy or the old
# spills cost more is for a GPU to tell (`bnorder check --gpu`).
GPU_MAXNREG = 255


def gpu_compile_options(gpu: bool) -> dict:
    """Compile options of every GPU launch (none in the interpreter)."""
    return {"maxnreg": GPU_MAXNREG} if gpu else {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# fused.triton.aot runs the launchers on meta tensors to record the launches a GPU would get
# (kernels are compiled, never run): while it does, a meta tensor stands for a CUDA tensor.
RECORDING_META_AS_CUDA = False


def on_gpu(t: Tensor) -> bool:
    """Whether t's kernels launch on a GPU (and so take the GPU launch parameters)."""
    return t.device.type == "cuda" or (RECORDING_META_AS_CUDA and t.device.type == "meta")


# FUSED_TRITON_LAUNCH=gpu makes CPU tensors in the interpreter take the launch parameters a
# GPU takes (tiles, conv blocks, split-K, tensor-core dot dtypes, tf32), so that those are
# checked numerically here; the default, auto, gives the interpreter its own large blocks.
LAUNCH_ENV = "FUSED_TRITON_LAUNCH"
LAUNCH_CHOICES = ("auto", "gpu")


def gpu_launch(t: Tensor) -> bool:
    """Whether the launches for t take a GPU's parameters: on a GPU always, on CPU tensors
    when FUSED_TRITON_LAUNCH=gpu. Read at every call, like BNORDER_CONV_IMPL."""
    value = os.environ.get(LAUNCH_ENV, "auto").strip().lower() or "auto"
    if value not in LAUNCH_CHOICES:
        raise ValueError(f"{LAUNCH_ENV}={value!r} is not one of {LAUNCH_CHOICES}")
    return on_gpu(t) or value == "gpu" or not interpreting()


def check_runnable(t: Tensor, op: str) -> None:
    """Triton launches CUDA tensors on the GPU and CPU tensors only in the interpreter."""
    if on_gpu(t):
        return
    if t.device.type == "cpu" and interpreting():
        return
    if t.device.type == "cpu":
        raise RuntimeError(
            f"{op}: the Triton backend got a CPU tensor but TRITON_INTERPRET is not set; set "
            f"TRITON_INTERPRET=1 before importing fused (or use FUSED_BACKEND=cpp)")
    raise RuntimeError(f"{op}: the Triton backend runs on CUDA tensors, got {t.device}")


def acc_dtype(t: Tensor) -> torch.dtype:
    """float64 activations accumulate in float64 (GPUs have it, slowly); all else in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def tl_acc(t: Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


@dataclass(frozen=True)
class Geometry:
    outer: int
    inner: int
    channels: int
    s_outer: int
    s_inner: int
    s_channel: int

    @property
    def channels_fastest(self) -> bool:
        return self.s_channel == 1 and self.inner > 1


INT32_LIMIT = 2 ** 31


def check_index_range(op: str, *tensors: Tensor) -> None:
    """The kernels form row indices (n, h, w) and offsets inside one image in int32 and
    only the per-image base in int64: refuse what would wrap instead of reading wrong
    addresses (the interpreter would not show it)."""
    for t in tensors:
        if t.dim() < 2 or t.numel() == 0:
            continue
        rows, per_image = t.numel() // t.shape[1], t.numel() // t.shape[0]
        if rows >= INT32_LIMIT or per_image >= INT32_LIMIT:
            raise ValueError(
                f"{op}: a tensor of size {tuple(t.shape)} has {rows} positions N·H·W and "
                f"{per_image} elements per sample; the Triton kernels index both in int32 "
                f"(limit 2^31 − 1): split the batch, or use FUSED_BACKEND=cpp")


def geometry(t: Tensor, op: str) -> Geometry:
    if t.dim() < 2:
        raise ValueError(f"{op}: expected a tensor with a channel dimension (N, C, ...), got "
                         f"{t.dim()}-D input")
    n, c = t.shape[0], t.shape[1]
    if c == 0:
        raise ValueError(f"{op}: the tensor has no channels (size {tuple(t.shape)})")
    check_index_range(op, t)
    s = t.numel() // (n * c) if n else 0
    if t.is_contiguous() and (t.dim() == 2 or s == 1):
        return Geometry(1, n * s, c, 0, c, 1)
    if t.is_contiguous():
        return Geometry(n, s, c, c * s, 1, s)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return Geometry(1, n * s, c, 0, c, 1)
    raise ValueError(f"{op}: expected a contiguous or channels_last tensor, got strides "
                     f"{t.stride()}; call .contiguous() first")


def memory_format(t: Tensor) -> torch.memory_format:
    """ATen's choice for a convolution output: channels_last when t is laid out channel-
    fastest, including the ambiguous single-channel case (stride(1) == 1 < H·W)."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and (
            not t.is_contiguous() or (t.stride(1) == 1 and t.shape[2] * t.shape[3] > 1)):
        return torch.channels_last
    return torch.contiguous_format


@dataclass(frozen=True)
class Tiling:
    block_i: int
    block_c: int
    tiles_per_split: int  # reductions: consecutive inner tiles one program merges
    splits: int           # reductions: programs per outer index along inner
    options: dict         # compile options (gpu_compile_options)

    def grid(self, geo: Geometry):
        return (geo.outer * self.splits, triton.cdiv(geo.channels, self.block_c))


def tiling(geo: Geometry, reduction: bool, gpu: bool, dtype: torch.dtype) -> Tiling:
    """Launch parameters of every BN primitive (`gpu`: a GPU's, else the interpreter's; see
    gpu_launch). Tile shape: the stride-1 axis gets the long side of the tile. Float64 GPU
    tiles get half the elements (see TILE_ELEMS_GPU)."""
    budget = TILE_ELEMS_GPU if gpu else TILE_ELEMS_INTERPRETER
    if gpu and dtype == torch.float64:
        budget //= 2
    inner_p2 = triton.next_power_of_2(max(geo.inner, 1))
    chan_p2 = triton.next_power_of_2(geo.channels)
    if geo.channels_fastest:
        block_c = min(chan_p2, 128 if gpu else budget)
        block_i = max(1, min(inner_p2, budget // block_c))
    else:
        block_i = min(inner_p2, 1024 if gpu else budget)
        block_c = max(1, min(chan_p2, budget // block_i))
    tiles = triton.cdiv(max(geo.inner, 1), block_i)
    if not reduction or not gpu:
        per_split = tiles if reduction else 1
    else:
        programs_wanted = max(1, GPU_PROGRAMS // (geo.outer * triton.cdiv(geo.channels,
                                                                          block_c)))
        per_split = max(1, triton.cdiv(tiles, programs_wanted))
    return Tiling(block_i, block_c, per_split, triton.cdiv(tiles, per_split),
                  gpu_compile_options(gpu))
