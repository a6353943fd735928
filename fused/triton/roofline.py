"""A roofline on paper for every Triton kernel: compulsory bytes and FLOPs at stated network
layer shapes, and the time they imply at published H100 / A100 peaks.

**Compiled, not run.** No figure here was measured: they are lower bounds on a kernel's time
(max(bytes / bandwidth, FLOPs / peak)) from the vendors' published dense peaks. `bnorder check
--gpu` divides a measured time into them to print the share of the roofline reached.

Traffic model: every tensor a kernel reads or writes is moved once (its compulsory traffic);
re-reads that tiling causes (the input gradient's taps, the split-K partial slices' second
pass) are not counted, so a kernel can only be slower than this, never faster. Per-channel
vectors and (P, C) partial buffers are counted at their size.

    A       one activation tensor of the layer, N·C·H·W elements (the tensor the norm sees)
    conv    FLOPs = 2·N·P·Q·O·C·R·S (a multiply-add is two), the same for forward, input
            gradient and weight gradient

Use:

    layer = roofline.LAYERS["resnet50.conv2_3x3"]
    cost = roofline.kernel_cost("conv_fwd_kernel", layer, torch.float16)
    t = roofline.bound_seconds(cost, roofline.GPUS["H100"], torch.float16)
    share = roofline.share(measured_seconds, cost, roofline.gpu_named(name), torch.float16)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch


@dataclass(frozen=True)
class Peak:
    """Published dense peaks of one GPU (bytes/s and FLOP/s, no sparsity)."""
    name: str
    bandwidth: float
    fp64: float
    fp32: float
    tf32: float
    bf16: float

    def flops(self, dtype: torch.dtype, tf32: bool = False) -> float:
        """The peak that applies to a dot in `dtype` (float32 as TF32 when `tf32`)."""
        if dtype in (torch.float16, torch.bfloat16):
            return self.bf16
        if dtype == torch.float64:
            return self.fp64
        return self.tf32 if tf32 else self.fp32


# H100 SXM5 and A100 SXM4 80 GB datasheets: HBM bandwidth, fp32 (non-tensor) and the dense
# tensor-core rates; fp64 is the tensor-core fp64 rate (Triton's float64 dot uses DMMA).
GPUS: Dict[str, Peak] = {
    "H100": Peak("H100", bandwidth=3.35e12, fp64=67e12, fp32=67e12, tf32=494.7e12,
                 bf16=989.4e12),
    "A100": Peak("A100", bandwidth=2.0e12, fp64=19.5e12, fp32=19.5e12, tf32=156e12,
                 bf16=312e12),
}


def gpu_named(device_name: str) -> Optional[Peak]:
    """The peaks for a `torch.cuda.get_device_name()` string, or None for other GPUs."""
    for key, peak in GPUS.items():
        if key in device_name.upper():
            return peak
    return None


@dataclass(frozen=True)
class Layer:
    """One convolution layer with the norm next to it: x (N, C, H, W) → y (N, O, P, Q)."""
    name: str
    n: int
    c: int
    h: int
    w: int
    o: int
    r: int
    s: int
    stride: int
    padding: int

    @property
    def p(self) -> int:
        return (self.h + 2 * self.padding - self.r) // self.stride + 1

    @property
    def q(self) -> int:
        return (self.w + 2 * self.padding - self.s) // self.stride + 1

    @property
    def x_elems(self) -> int:
        return self.n * self.c * self.h * self.w

    @property
    def y_elems(self) -> int:
        return self.n * self.o * self.p * self.q

    @property
    def w_elems(self) -> int:
        return self.o * self.c * self.r * self.s

    @property
    def conv_flops(self) -> int:
        return 2 * self.n * self.p * self.q * self.o * self.c * self.r * self.s

    def describe(self) -> str:
        return (f"{self.n}×{self.c}×{self.h}×{self.w} → {self.o}, {self.r}×{self.s}"
                f"{f' /{self.stride}' if self.stride > 1 else ''}")


# Stated layer shapes: ResNet-20 on CIFAR-10 at batch 128, VGG-16 and ResNet-50 on ImageNet
# (224 × 224) at batch 64. One layer per stage kind, the shapes the networks in models/ build.
LAYERS: Dict[str, Layer] = {layer.name: layer for layer in (
    Layer("resnet20.stage1", 128, 16, 32, 32, 16, 3, 3, 1, 1),
    Layer("resnet20.stage2_down", 128, 16, 32, 32, 32, 3, 3, 2, 1),
    Layer("resnet20.stage3", 128, 64, 8, 8, 64, 3, 3, 1, 1),
    Layer("vgg16.conv1_2", 64, 64, 224, 224, 64, 3, 3, 1, 1),
    Layer("vgg16.conv3_2", 64, 256, 56, 56, 256, 3, 3, 1, 1),
    Layer("vgg16.conv5_2", 64, 512, 14, 14, 512, 3, 3, 1, 1),
    Layer("resnet50.conv1", 64, 3, 224, 224, 64, 7, 7, 2, 3),
    Layer("resnet50.conv2_1x1_in", 64, 256, 56, 56, 64, 1, 1, 1, 0),
    Layer("resnet50.conv2_3x3", 64, 64, 56, 56, 64, 3, 3, 1, 1),
    Layer("resnet50.conv2_1x1_out", 64, 64, 56, 56, 256, 1, 1, 1, 0),
    Layer("resnet50.conv5_3x3", 64, 512, 7, 7, 512, 3, 3, 1, 1),
)}


@dataclass(frozen=True)
class Cost:
    bytes: float
    flops: float
    dot_flops: bool = False  # the FLOPs run on tensor cores (a tl.dot), not the vector units

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else float("inf")


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _acc_size(dtype: torch.dtype) -> int:
    return 8 if dtype == torch.float64 else 4


# Elementwise FLOPs per element of the BN passes (multiply-adds count two); they only matter
# against bandwidth, which always dominates them. apply: (t − mean)·s + shift, then the ReLU.
_ELEMENTWISE_FLOPS = {"stats_partial_kernel": 6, "apply_kernel": 4,
                      "backward_reduce_kernel": 6, "backward_apply_kernel": 8}
# Tensors of size A each BN pass reads + writes (DESIGN §4's table).
_BN_PASSES = {"stats_partial_kernel": 1, "apply_kernel": 2, "backward_reduce_kernel": 2,
              "backward_apply_kernel": 3}
# (P, C) buffers each merge kernel reads: four moments or two sums.
_MERGE_BUFFERS = {"merge_moments_kernel": 4, "sum_partials_kernel": 2}
_CONV_KERNELS = ("conv_fwd_kernel", "conv_dgrad_kernel", "conv_wgrad_kernel")


def kernel_cost(kernel: str, layer: Layer, dtype: torch.dtype, *, norm_side: str = "output",
                partial_rows: int = 1024, prologue: int = 0, reduce: bool = False,
                stats: bool = False, norm_input: bool = False) -> Cost:
    """Compulsory bytes and FLOPs of one launch of `kernel` at `layer` in `dtype`.

    norm_side: for the BN kernels, whether the norm sees the conv's output ("output":
    conv-bn-relu, conv-relu-bn; N·O·P·Q elements) or its input ("input": bn-conv-relu).
    partial_rows: P of the (P, C) partial buffers the merge kernels read.
    prologue/reduce/stats/norm_input: the conv kernels' fused BN work (conv.py's flags)."""
    e, acc = _size(dtype), _acc_size(dtype)
    if kernel in _BN_PASSES:
        elems, channels = ((layer.y_elems, layer.o) if norm_side == "output"
                           else (layer.x_elems, layer.c))
        moved = _BN_PASSES[kernel] * elems * e + 6 * channels * acc
        return Cost(moved, _ELEMENTWISE_FLOPS[kernel] * elems)
    if kernel in _MERGE_BUFFERS:
        channels = layer.o if norm_side == "output" else layer.c
        reads = _MERGE_BUFFERS[kernel] * partial_rows * channels * acc
        return Cost(reads + 2 * channels * acc, 4 * partial_rows * channels)
    x, y, w = layer.x_elems * e, layer.y_elems * e, layer.w_elems * e
    vectors = 6 * max(layer.c, layer.o) * acc
    if kernel == "conv_fwd_kernel":
        partials = 4 * (layer.y_elems // max(layer.o, 1)) // 64 * layer.o * acc if stats else 0
        return Cost(x + w + y + partials + (vectors if norm_input else 0), layer.conv_flops,
                    dot_flops=True)
    if kernel == "conv_dgrad_kernel":
        saved = y if prologue in (1, 2) else 0
        return Cost(y + saved + w + x + (x if reduce else 0), layer.conv_flops, dot_flops=True)
    if kernel == "conv_wgrad_kernel":
        saved = y if prologue in (1, 2) else 0
        return Cost(y + saved + x + layer.w_elems * acc, layer.conv_flops, dot_flops=True)
    known = sorted([*_BN_PASSES, *_MERGE_BUFFERS, *_CONV_KERNELS])
    raise KeyError(f"no roofline for kernel {kernel!r}; known: {known}")


def bound_seconds(cost: Cost, gpu: Peak, dtype: torch.dtype, tf32: bool = False) -> float:
    """The roofline time: max(bytes / bandwidth, FLOPs / the peak that applies)."""
    peak = gpu.flops(dtype, tf32) if cost.dot_flops else (
        gpu.fp64 if dtype == torch.float64 else gpu.fp32)
    return max(cost.bytes / gpu.bandwidth, cost.flops / peak)


def bound_by(cost: Cost, gpu: Peak, dtype: torch.dtype, tf32: bool = False) -> str:
    """"memory" or "compute": which side of the ridge the kernel sits on at this shape."""
    peak = gpu.flops(dtype, tf32) if cost.dot_flops else gpu.fp32
    return "compute" if cost.flops / peak > cost.bytes / gpu.bandwidth else "memory"


def share(measured_seconds: float, cost: Cost, gpu: Optional[Peak], dtype: torch.dtype,
          tf32: bool = False) -> Optional[float]:
    """Fraction of the roofline a measured time reaches (1.0 = at the published peak), or
    None when the GPU has no entry in GPUS."""
    if gpu is None:
        return None
    if not measured_seconds > 0:
        raise ValueError(f"measured time must be positive, got {measured_seconds}")
    return bound_seconds(cost, gpu, dtype, tf32) / measured_seconds


# The kernels of one training step of a unit, with the flags the fused path launches them
# with (conv-bn-relu on the fused convolution: stats in the forward epilogue, dy formed on
# load in both backward convolutions).
UNIT_KERNELS = (
    ("conv_fwd_kernel", dict(stats=True)),
    ("apply_kernel", {}),
    ("backward_reduce_kernel", {}),
    ("conv_dgrad_kernel", dict(prologue=1)),
    ("conv_wgrad_kernel", dict(prologue=1)),
)


def rows(dtypes=(torch.bfloat16, torch.float32)):
    """(layer, kernel, dtype, MB, GFLOP, H100 µs, A100 µs, bound) for every stated layer."""
    out = []
    for layer in LAYERS.values():
        for dtype in dtypes:
            for kernel, flags in UNIT_KERNELS:
                cost = kernel_cost(kernel, layer, dtype, **flags)
                times = [bound_seconds(cost, GPUS[g], dtype, tf32=dtype == torch.float32)
                         * 1e6 for g in ("H100", "A100")]
                out.append((layer, kernel, dtype, cost.bytes / 1e6, cost.flops / 1e9, *times,
                            bound_by(cost, GPUS["H100"], dtype, tf32=dtype == torch.float32)))
    return out


def main() -> None:
    """`python -m fused.triton.roofline`: the table, labelled compiled, not run."""
    from rich.console import Console
    from rich.table import Table
    table = Table(title="Roofline on paper at published peaks (compiled, not run; float32 "
                        "as TF32)")
    for col in ("layer", "shape", "kernel", "dtype", "MB", "GFLOP", "H100 µs", "A100 µs",
                "H100 bound"):
        table.add_column(col, justify="right" if col in ("MB", "GFLOP", "H100 µs",
                                                          "A100 µs") else "left")
    for layer, kernel, dtype, mb, gf, h100, a100, bound in rows():
        table.add_row(layer.name, layer.describe(), kernel, str(dtype).replace("torch.", ""),
                      f"{mb:.1f}", f"{gf:.2f}", f"{h100:.1f}", f"{a100:.1f}", bound)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
