"""ResNets (He et al. 2015): ResNet-20 for CIFAR and ResNet-18/34/50/101.

A block's residual branch is its units in sequence (basic: 3×3 → 3×3; bottleneck:
1×1 → 3×3 (stride here, as torchvision's "v1.5") → 1×1 at 4× width). Where the order ends
with ReLU, the last unit of the branch is built with relu=False and the ReLU follows the
addition; with conv-relu-bn the branch ends with the norm and is added as it is:

    conv-bn-relu                 conv-relu-bn                 bn-conv-relu
    x ─┬─ conv N relu            x ─┬─ conv relu N            x ─┬─ N conv relu
       │  conv N                    │  conv relu N               │  N conv
       └─ shortcut ─(+)─ relu       └─ shortcut ─(+)─►           └─ shortcut ─(+)─ relu

Shortcuts: identity where shape is kept. Where it changes, ResNet-20 uses the
parameter-free option A (subsample by the stride, zero-pad the new channels) and
ResNet-18/34/50/101 a projection: a 1×1 strided unit with relu=False, so its norm follows
the chosen norm and order (conv → N, conv → N, N → conv).

Width: `width` multiplies every stage's channel count (ResNet-20 at 0.5: 8/16/32), the
bottleneck's 4× expansion included, so blocks, shortcuts and placement stay as they are.

Stems: ResNet-20 (32×32 input): U(3×3, 16). ResNet-18+ by default the ImageNet stem
(224×224 input): U(7×7/2, 64) → maxpool 3×3/2; with `stem="cifar"`: U(3×3, 64), no pool.
With bn-conv-relu the stem unit's norm sees the raw image (a learned input standardization,
kept by default; `input_norm=False` empties that one slot), and the first block's norm sees
the max-pooled tensor. Then global average pooling and the Linear classifier.

With conv-bn-relu and norm bn the parameter counts equal the published ones (1000 classes:
ResNet-18 11,689,512, -34 21,797,672, -50 25,557,032, -101 44,549,160; ResNet-20 with 10
classes: 269,722). bn-conv-relu's norms count input channels, so its counts differ a little.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fused

from ._blocks import Units, check_width, scaled


def _zeros(shape, like: Tensor, layout: torch.memory_format) -> Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device,
                       memory_format=layout).zero_()


class _OptionA(torch.autograd.Function):
    """y = x[:, :, ::stride, ::stride] placed at channels [low, low + C) of a zero tensor.

    Written out rather than as a slice and F.pad because of the backward: a strided slice's
    backward scatters into a new NCHW-contiguous tensor whatever the input's layout, which
    turned the gradient of a channels_last network NCHW at every downsampling block (and
    every block upstream then ran on mixed layouts). avg_pool2d with a 1×1 kernel keeps the
    layout but is 2-3× slower than the slice in NCHW. Here both directions allocate in the
    input's layout and copy once."""

    @staticmethod
    def forward(ctx, x: Tensor, stride: int, out_channels: int) -> Tensor:
        ctx.layout = fused.memory_format_of(x)
        ctx.in_shape, ctx.stride, ctx.low = x.shape, stride, (out_channels - x.shape[1]) // 2
        sub = x[:, :, ::stride, ::stride]
        y = _zeros((x.shape[0], out_channels) + sub.shape[2:], x, ctx.layout)
        y[:, ctx.low:ctx.low + x.shape[1]] = sub
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        dx = _zeros(ctx.in_shape, grad, ctx.layout)
        dx[:, :, ::ctx.stride, ::ctx.stride] = grad[:, ctx.low:ctx.low + ctx.in_shape[1]]
        return dx, None, None


class ShortcutA(nn.Module):
    """Option A: x[:, :, ::stride, ::stride] with zero channels added around it."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride, self.out_channels = stride, out_channels
        if out_channels < in_channels:
            raise ValueError(f"option A adds channels; got {in_channels} -> {out_channels}")

    def forward(self, x: Tensor) -> Tensor:
        return _OptionA.apply(x, self.stride, self.out_channels)


class GlobalAvgPool(nn.Module):
    """N×C×H×W → N×C, the mean over each map. Not nn.AdaptiveAvgPool2d(1): on CPU its
    backward returns the gradient NCHW-contiguous for a channels_last input (the N×C×1×1
    gradient it starts from is both layouts at once), and every residual addition, ReLU and
    norm upstream then ran on mixed layouts: strided loops and layout copies in each block
    (with the option-A shortcut's same fault, up to 33 of 200 ms per channels_last ResNet-20
    step). avg_pool2d over the whole map gives the input's layout back."""

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, x.shape[-2:]).flatten(1)


class Block(nn.Module):
    """One residual block; `branch` holds its units, `shortcut` the identity, option A or
    the projection unit."""

    def __init__(self, units: Units, in_channels: int, width: int, stride: int, *,
                 bottleneck: bool, projection: bool):
        super().__init__()
        out = width * (4 if bottleneck else 1)
        if bottleneck:
            shapes = [(in_channels, width, 1, 1, 0), (width, width, 3, stride, 1),
                      (width, out, 1, 1, 0)]
        else:
            shapes = [(in_channels, width, 3, stride, 1), (width, width, 3, 1, 1)]
        last = len(shapes) - 1
        self.branch = nn.Sequential(*(
            units(*shape, relu=(i < last or not units.relu_after_add))
            for i, shape in enumerate(shapes)))
        if stride == 1 and in_channels == out:
            self.shortcut = nn.Identity()
        elif projection:
            self.shortcut = units(in_channels, out, 1, stride, 0, relu=False)
        else:
            self.shortcut = ShortcutA(in_channels, out, stride)
        self.relu_after_add = units.relu_after_add
        self.out_channels = out

    def forward(self, x: Tensor) -> Tensor:
        out = self.branch(x) + self.shortcut(x)
        return F.relu(out) if self.relu_after_add else out


class ResNet(nn.Module):
    """stem → layer1 … layerK (blocks) → global average pool → fc (Linear)."""

    def __init__(self, units: Units, blocks: Sequence[int], widths: Sequence[int], *,
                 bottleneck: bool, projection: bool, stem: str, in_channels: int,
                 num_classes: int, width: float = 1.0):
        super().__init__()
        width = check_width(width)
        widths = [scaled(w, width) for w in widths]
        if stem == "imagenet":
            self.stem = nn.Sequential(units(in_channels, widths[0], 7, 2, 3, first=True),
                                      nn.MaxPool2d(3, 2, 1))
        elif stem == "cifar":
            self.stem = nn.Sequential(units(in_channels, widths[0], 3, 1, 1, first=True))
        else:
            raise ValueError(f"unknown stem {stem!r}; expected 'imagenet' or 'cifar'")
        channels = widths[0]
        self.layers = []
        for i, (count, width) in enumerate(zip(blocks, widths)):
            layer = []
            for j in range(count):
                block = Block(units, channels, width, 2 if j == 0 and i > 0 else 1,
                              bottleneck=bottleneck, projection=projection)
                layer.append(block)
                channels = block.out_channels
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            self.layers.append(f"layer{i + 1}")
        self.pool = GlobalAvgPool()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for name in self.layers:
            x = getattr(self, name)(x)
        return self.fc(self.pool(x))


def resnet20(units: Units, *, in_channels: int, num_classes: int,
             width: float = 1.0) -> ResNet:
    return ResNet(units, (3, 3, 3), (16, 32, 64), bottleneck=False, projection=False,
                  stem="cifar", in_channels=in_channels, num_classes=num_classes, width=width)


def _imagenet_resnet(blocks: Sequence[int], bottleneck: bool):
    def build(units: Units, *, in_channels: int, num_classes: int,
              stem: str = "imagenet", width: float = 1.0) -> ResNet:
        return ResNet(units, blocks, (64, 128, 256, 512), bottleneck=bottleneck,
                      projection=True, stem=stem, in_channels=in_channels,
                      num_classes=num_classes, width=width)
    return build


resnet18 = _imagenet_resnet((2, 2, 2, 2), bottleneck=False)
resnet34 = _imagenet_resnet((3, 4, 6, 3), bottleneck=False)
resnet50 = _imagenet_resnet((3, 4, 6, 3), bottleneck=True)
resnet101 = _imagenet_resnet((3, 4, 23, 3), bottleneck=True)
