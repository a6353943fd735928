"""Eager reference for every order and norm, and the four BN primitives in plain torch.

Two things live here, both float64-capable and both written for clarity, not speed:

* ``unit_forward`` — what a unit computes, built from ``F.conv2d``, ``F.batch_norm`` and
  ``F.relu`` exactly as a PyTorch user would write it. Tests and benchmarks compare every
  backend against it; autograd through it is the reference for every gradient.
* ``stats`` / ``apply`` / ``backward_reduce`` / ``backward_apply`` — the four primitives of
  DESIGN §4 with the same signatures as the C++ and Triton kernels. They back the
  ``reference`` backend, so that the fused autograd algebra can be checked in float64
  independently of any kernel.

ReLU placement inside the primitives is a ``relu_mode``:

    RELU_NONE   = 0   norm(t)
    RELU_AFTER  = 1   relu(norm(t))      (conv-bn-relu)
    RELU_BEFORE = 2   norm(relu(t))      (conv-relu-bn)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

RELU_NONE, RELU_AFTER, RELU_BEFORE = 0, 1, 2

ORDERS = ("conv-bn-relu", "conv-relu-bn", "bn-conv-relu")
NORMS = ("bn", "bn-minus", "affine", "none")


def norm_forward(t: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
                 momentum: float, eps: float, norm: str) -> Tensor:
    """The norm slot in eager PyTorch: nn.BatchNorm2d's functional form, or the affine layer."""
    if norm == "none":
        return t
    if norm == "affine":
        shape = (1, -1) + (1,) * (t.dim() - 2)
        return t * weight.view(shape) + bias.view(shape)
    if norm == "bn-minus":
        weight = bias = None
    return F.batch_norm(t, running_mean, running_var, weight, bias, training, momentum, eps)


def unit_forward(order: str, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                 stride=1, padding=0, dilation=1, groups: int = 1,
                 running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                 norm_weight: Optional[Tensor] = None, norm_bias: Optional[Tensor] = None,
                 training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                 norm: str = "bn", relu: bool = True) -> Tensor:
    """One unit in eager PyTorch. Arguments mirror ``F.conv2d`` then ``F.batch_norm``."""
    def conv(t):
        return F.conv2d(t, weight, bias, stride, padding, dilation, groups)

    def nrm(t):
        return norm_forward(t, running_mean, running_var, norm_weight, norm_bias,
                            training, momentum, eps, norm)

    act = F.relu if relu else (lambda t: t)
    if order == "conv-bn-relu":
        return act(nrm(conv(x)))
    if order == "conv-relu-bn":
        return nrm(act(conv(x)))
    if order == "bn-conv-relu":
        return act(conv(nrm(x)))
    raise ValueError(f"unknown order {order!r}; expected one of {ORDERS}")


# ----------------------------------------------------------------------------------------
# The four primitives in plain torch (the `reference` backend).
# Per-channel tensors are float32, or float64 for float64 activations; the mean may also be
# float64 for float32 activations, and the passes keep its digits (see _centered).
# ----------------------------------------------------------------------------------------

def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _per_channel(v: Tensor, t: Tensor) -> Tensor:
    return v.view((1, -1) + (1,) * (t.dim() - 2))


def _reduce_dims(t: Tensor):
    return [d for d in range(t.dim()) if d != 1]


def stats(t: Tensor, relu_mode: int):
    """Per-channel mean and biased variance of t (of relu(t) for RELU_BEFORE)."""
    a = t.to(_acc_dtype(t))
    if relu_mode == RELU_BEFORE:
        a = a.clamp_min(0)
    var, mean = torch.var_mean(a, dim=_reduce_dims(t), correction=0)
    return mean, var


def _centered(t_in: Tensor, mean: Tensor, t: Tensor) -> Tensor:
    """t_in − mean in t_in's dtype, the mean as its rounding hi plus the rest lo: (t − hi) − lo
    keeps the digits of a float64 mean on data far from zero (fused/_norm.py)."""
    hi = mean.to(t_in.dtype)
    lo = (mean.to(torch.float64) - hi.to(torch.float64)).to(t_in.dtype)
    return (t_in - _per_channel(hi, t)) - _per_channel(lo, t)


def _pre_activation(t_in: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, t: Tensor) -> Tensor:
    """(t_in − mean)·scale + shift: the norm before a ReLU after it."""
    return _centered(t_in, mean, t) * _per_channel(scale, t) + _per_channel(shift, t)


def apply(t: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, relu_mode: int) -> Tensor:
    a = t.to(_acc_dtype(t))
    if relu_mode == RELU_BEFORE:
        a = a.clamp_min(0)
    out = _pre_activation(a, mean, scale, shift, t)
    if relu_mode == RELU_AFTER:
        out = out.clamp_min(0)
    return out.to(t.dtype)


def _masked_grad_and_input(g: Tensor, t: Tensor, mean: Tensor, scale: Tensor, shift: Tensor,
                           relu_mode: int):
    """(g', t_in): the gradient at the norm's output and the tensor the norm saw."""
    acc = _acc_dtype(t)
    g = g.to(acc)
    t_in = t.to(acc)
    if relu_mode == RELU_AFTER:
        g = torch.where(_pre_activation(t_in, mean, scale, shift, t) > 0, g, 0.0)
    elif relu_mode == RELU_BEFORE:
        t_in = t_in.clamp_min(0)
    return g, t_in


def backward_reduce(g: Tensor, t: Tensor, mean: Tensor, scale: Tensor, shift: Tensor,
                    relu_mode: int):
    """Per-channel Σg' and Σg'·(t_in − mean)."""
    g, t_in = _masked_grad_and_input(g, t, mean, scale, shift, relu_mode)
    dims = _reduce_dims(t)
    return g.sum(dims), (g * _centered(t_in, mean, t)).sum(dims)


def backward_apply(g: Tensor, t: Tensor, mean: Tensor, scale: Tensor, shift: Tensor,
                   k1: Tensor, k2: Tensor, k3: Tensor, relu_mode: int) -> Tensor:
    """dt = mask · (g'·k1 + (t_in − mean)·k2 + k3), per-channel k's.

    Centering before scaling keeps the gradient exact for data far from zero (mean 1e4)."""
    gm, t_in = _masked_grad_and_input(g, t, mean, scale, shift, relu_mode)
    dt = (gm * _per_channel(k1, t) + _centered(t_in, mean, t) * _per_channel(k2, t)
          + _per_channel(k3, t))
    if relu_mode == RELU_BEFORE:
        dt = torch.where(t > 0, dt, 0.0)
    return dt.to(t.dtype)


# bn-conv-relu's two passes around its folded convolution (see fused/bn_conv_relu.py).

def add_map_relu(z: Tensor, map: Tensor, relu: bool) -> Tensor:
    """relu(z + map), map one image broadcast over the batch."""
    out = z + map
    return out.clamp_min(0) if relu else out


def relu_grad_batch_sum(g: Tensor, out: Tensor):
    """(g·[out > 0], its sum over the batch)."""
    gz = torch.ops.aten.threshold_backward(g, out, 0)
    return gz, gz.sum(0, keepdim=True)
