"""Thin helpers around ATen's convolution, shared by the orders (the convolution itself stays
in ATen/oneDNN on CPU: DESIGN §4)."""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence

import torch
from torch import Tensor


def pair(value, name: str) -> List[int]:
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int is type(value[1]):
        return list(value)  # an nn.Conv2d attribute: the common case, checked cheaply
    if isinstance(value, str):
        raise ValueError(f"{name}={value!r}: string padding modes are not supported by the "
                         f"fused ops; give the padding in pixels")
    if isinstance(value, int):
        return [value, value]
    value = [int(v) for v in value]
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {value}")
    return value


def conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
         padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    # torch.convolution is aten::convolution without the torch.ops Python wrapper (~8 µs a
    # call), and works on fake tensors alike.
    return torch.convolution(x, weight, bias, stride, padding, dilation, False, [0, 0], groups)


def conv_backward(grad: Tensor, x: Tensor, weight: Tensor, stride, padding, dilation,
                  groups: int, mask: Sequence[bool]):
    """(d input, d weight, d bias) of conv(x, weight) for gradient `grad`; entries not in
    `mask` are None."""
    return torch.ops.aten.convolution_backward(grad, x, weight, [weight.shape[0]], stride,
                                               padding, dilation, False, [0, 0], groups,
                                               list(mask))


def scale_in_channels(weight: Tensor, scale: Tensor, groups: int) -> Tensor:
    """weight[o, j, :, :] · scale[c(o, j)], c the input channel that weight entry reads.

    With groups, output channel o of group g reads input channels g·(C/groups) + j."""
    out_channels, per_group = weight.shape[:2]
    w = weight.to(scale.dtype).view(groups, out_channels // groups, per_group, *weight.shape[2:])
    s = scale.view(groups, 1, per_group, 1, 1)
    return (w * s).view(weight.shape).to(weight.dtype)


def scale_out_channels(weight: Tensor, scale: Tensor) -> Tensor:
    return (weight.to(scale.dtype) * scale.view(-1, 1, 1, 1)).to(weight.dtype)


def memory_format_of(t: Tensor) -> torch.memory_format:
    """channels_last when t is laid out channel-fastest, else contiguous (as ATen suggests)."""
    if t.dim() == 4 and t.shape[1] > 1 and t.stride(1) == 1 and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def dense(t: Tensor) -> Tensor:
    """t itself when it is contiguous or channels_last, else a dense copy in its format:
    the kernels read either layout but not arbitrary strides."""
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return t
    return t.contiguous(memory_format=memory_format_of(t))


def channel_sum(t: Tensor) -> Tensor:
    """Σ over N, H, W per channel with at::sum's cascaded accumulation. Not the bias gradient
    of ATen's convolution_backward, which costs the same pass over t: oneDNN accumulates it
    in plain float, 5-30x the error of at::sum (float32, 4x64x8x8 to 128x16x32x32), and as
    the norm's Σg it put fused gradients beyond eager's."""
    if memory_format_of(t) == torch.channels_last:
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).sum(0)
    return t.sum((0, 2, 3))


def batch_sum(t: Tensor) -> Tensor:
    """t.sum(0, keepdim=True) as one pass over contiguous memory: ATen's reduction over the
    batch of a channels_last tensor is ~25x slower than this column sum of its 2-D view."""
    if memory_format_of(t) == torch.channels_last:
        n, c, h, w = t.shape
        return t.permute(0, 2, 3, 1).reshape(n, -1).sum(0).view(1, h, w, c).permute(0, 3, 1, 2)
    return t.reshape(t.shape[0], -1).sum(0).view(1, *t.shape[1:])


@functools.lru_cache(maxsize=256)
def _inside_taps(in_hw: tuple, out_hw: tuple, kernel: tuple, stride: tuple, padding: tuple,
                 dilation: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(kH·kW, H_out·W_out): 1 where tap (k, l) of output pixel (i, j) reads inside the
    input image, 0 where it reads the zero padding; the product of one such 0/1 factor per
    axis, so the border map is one matrix product with it (cached per geometry)."""
    def inside(a):
        pos = (torch.arange(out_hw[a], device=device)[None, :] * stride[a] - padding[a]
               + torch.arange(kernel[a], device=device)[:, None] * dilation[a])
        return ((pos >= 0) & (pos < in_hw[a])).to(dtype)       # (k, out)
    h, w = inside(0), inside(1)
    return (h[:, None, :, None] * w[None, :, None, :]).reshape(kernel[0] * kernel[1], -1)


def _taps(weight: Tensor, in_hw, out_hw, stride, padding, dilation, dtype) -> Tensor:
    return _inside_taps(tuple(int(v) for v in in_hw), tuple(int(v) for v in out_hw),
                        tuple(weight.shape[2:]), tuple(stride), tuple(padding), tuple(dilation),
                        dtype, weight.device)


def _per_group_input(shift: Tensor, weight: Tensor, groups: int) -> Tensor:
    """(out, in/groups): the value b_c of the input channel each weight entry reads."""
    out_channels, per_group = weight.shape[:2]
    return (shift.view(groups, 1, per_group).expand(groups, out_channels // groups, per_group)
            .reshape(out_channels, per_group))


def border_map(shift: Tensor, weight: Tensor, in_hw, out_hw, stride, padding, dilation,
               groups: int) -> Tensor:
    """conv(B, weight) for the image B holding shift[c] inside its borders and zero padding,
    shape (1, out, H_out, W_out), computed separably (see bn_conv_relu)."""
    inside = _taps(weight, in_hw, out_hw, stride, padding, dilation, shift.dtype)
    v = (weight.to(shift.dtype) * _per_group_input(shift, weight, groups)[:, :, None, None]).sum(1)
    return (v.flatten(1) @ inside).view(1, -1, *out_hw)


def border_taps(grad_sum: Tensor, weight: Tensor, in_hw, stride, padding, dilation,
                dtype: torch.dtype) -> Tensor:
    """u[o, k, l] = Σ_{i,j} grad_sum[0, o, i, j]·inside_h[i, k]·inside_w[j, l], (out, kH, kW):
    the batch-summed output gradient that each weight tap carried from inside the image."""
    inside = _taps(weight, in_hw, grad_sum.shape[2:], stride, padding, dilation, dtype)
    return (grad_sum[0].to(dtype).flatten(1) @ inside.T).view(weight.shape[0],
                                                              *weight.shape[2:])


def border_map_weight_grad(shift: Tensor, taps: Tensor, weight: Tensor, groups: int) -> Tensor:
    """The weight gradient of border_map, b_c·u[o, k, l] (u from border_taps), in weight's
    dtype."""
    return (_per_group_input(shift, weight, groups)[:, :, None, None]
            * taps[:, None]).to(weight.dtype)


# bn-conv-relu's weight side in one call per direction; the C++ backend has the same two
# functions (csrc/fold.cpp), bn_conv_relu picks the backend's when it has them.
def fold_forward(weight: Tensor, scale: Tensor, shift: Tensor, in_hw, out_hw, stride, padding,
                 dilation, groups: int):
    """(W·s, border map conv(B, W)) for the folded forward."""
    return (scale_in_channels(weight, scale, groups),
            border_map(shift, weight, in_hw, out_hw, stride, padding, dilation, groups))


def fold_backward(weight: Tensor, wgrad: Tensor, grad_sum: Tensor, scale: Tensor,
                  shift: Tensor, in_hw, stride, padding, dilation, groups: int) -> Tensor:
    """dW = s·G + b·u from the weight gradient G = wgrad(x, g) and Σ_n g."""
    taps = border_taps(grad_sum, weight, in_hw, stride, padding, dilation, scale.dtype)
    return (scale_in_channels(wgrad, scale, groups)
            + border_map_weight_grad(shift, taps, weight, groups))
