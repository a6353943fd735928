"""The C++ CPU primitives (csrc/) behind the `cpp` backend, with fake implementations so
that torch.library.opcheck and torch.compile can reason about them."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _ext  # noqa: F401  (loading the extension registers the ops)
from . import _norm

name = "cpp"
_ops = torch.ops.bnorder_cpu


def stats(t: Tensor, relu_mode: int):
    return _ops.stats(t, relu_mode)


def exact_stats(t: Tensor, relu_mode: int):
    """stats in float64 whatever t's dtype (for the synchronized merge)."""
    return _ops.stats(t, relu_mode, True)


def apply(t: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, relu_mode: int) -> Tensor:
    return _ops.apply(t, mean, scale, shift, relu_mode)


def backward_reduce(g: Tensor, t: Tensor, mean: Tensor, scale: Tensor, shift: Tensor,
                    relu_mode: int):
    return _ops.backward_reduce(g, t, mean, scale, shift, relu_mode)


def backward_apply(g: Tensor, t: Tensor, mean: Tensor, scale: Tensor, shift: Tensor,
                   k1: Tensor, k2: Tensor, k3: Tensor, relu_mode: int) -> Tensor:
    return _ops.backward_apply(g, t, mean, scale, shift, k1, k2, k3, relu_mode)


def add_map_relu(z: Tensor, map: Tensor, relu: bool) -> Tensor:
    return _ops.add_map_relu(z, map, relu)


def relu_grad_batch_sum(g: Tensor, out: Tensor):
    return _ops.relu_grad_batch_sum(g, out)


def fold_forward(weight, scale, shift, in_hw, out_hw, stride, padding, dilation, groups):
    return _ops.fold_forward(weight, scale, shift, list(in_hw), list(out_hw), stride, padding,
                             dilation, groups)


def fold_backward(weight, wgrad, grad_sum, scale, shift, in_hw, stride, padding, dilation,
                  groups):
    return _ops.fold_backward(weight, wgrad, grad_sum, scale, shift, list(in_hw), stride,
                              padding, dilation, groups)


def fold_exact(mean: Tensor, var: Tensor, eps: float, limit: float) -> bool:
    """Whether |mean_c|·rstd_c <= limit for every channel (False for NaN statistics)."""
    return _ops.fold_exact(mean, var, eps, limit)


# The norm around the primitives in one call each (csrc/norm.cpp; _norm.forward/backward
# compose the same steps in torch ops for the other backends).
def coefficients(mean, var, gamma, beta, eps: float, norm_code: int, channels: int, acc):
    return _ops.coefficients(mean, var, gamma, beta, eps, norm_code, channels, acc)


def norm_forward(t: Tensor, gamma, beta, mean_in, var_in, eps: float, norm_code: int,
                 relu_mode: int, apply: bool):
    return _ops.norm_forward(t, gamma, beta, mean_in, var_in, eps, norm_code, relu_mode, apply)


def norm_backward(g: Tensor, t: Tensor, mean, var, gamma, beta, eps: float, norm_code: int,
                  relu_mode: int, batch_stats: bool, input_grad: bool):
    return _ops.norm_backward(g, t, mean, var, gamma, beta, eps, norm_code, relu_mode,
                              batch_stats, input_grad)


if _ext.loaded:
    @torch.library.register_fake("bnorder_cpu::stats")
    def _(t, relu_mode, exact=False):
        c, dtype = t.shape[1], torch.float64 if exact else _norm.acc_dtype(t)
        return t.new_empty(c, dtype=dtype), t.new_empty(c, dtype=dtype)

    @torch.library.register_fake("bnorder_cpu::apply")
    def _(t, mean, scale, shift, relu_mode):
        return torch.empty_like(t)

    @torch.library.register_fake("bnorder_cpu::backward_reduce")
    def _(g, t, mean, scale, shift, relu_mode):
        c = t.shape[1]
        return t.new_empty(c, dtype=_norm.acc_dtype(t)), t.new_empty(c, dtype=_norm.acc_dtype(t))

    @torch.library.register_fake("bnorder_cpu::backward_apply")
    def _(g, t, mean, scale, shift, k1, k2, k3, relu_mode):
        return torch.empty_like(t)

    @torch.library.register_fake("bnorder_cpu::add_map_relu")
    def _(z, map, relu):
        return torch.empty_like(z)

    @torch.library.register_fake("bnorder_cpu::coefficients")
    def _(mean, var, gamma, beta, eps, norm, channels, acc):
        like = mean if mean is not None else gamma
        return (like.new_empty(channels, dtype=acc), like.new_empty(channels, dtype=acc),
                like.new_empty(channels, dtype=torch.float64), like.new_empty(channels, dtype=acc))

    @torch.library.register_fake("bnorder_cpu::norm_forward")
    def _(t, gamma, beta, mean_in, var_in, eps, norm, relu_mode, apply):
        c = t.shape[1]
        stat = 0 if norm == 2 or mean_in is not None else c
        return (torch.empty_like(t) if apply else t.new_empty(0),
                t.new_empty(stat, dtype=torch.float64), t.new_empty(stat, dtype=torch.float64),
                t.new_empty(c, dtype=_norm.acc_dtype(t)), t.new_empty(c, dtype=_norm.acc_dtype(t)))

    @torch.library.register_fake("bnorder_cpu::norm_backward")
    def _(g, t, mean, var, gamma, beta, eps, norm, relu_mode, batch_stats, input_grad):
        c = t.shape[1]
        return (torch.empty_like(t) if input_grad else t.new_empty(0),
                t.new_empty(c, dtype=_norm.acc_dtype(t)), t.new_empty(c, dtype=_norm.acc_dtype(t)))

    @torch.library.register_fake("bnorder_cpu::fold_forward")
    def _(weight, scale, shift, in_hw, out_hw, stride, padding, dilation, groups):
        return torch.empty_like(weight), weight.new_empty(1, weight.shape[0], *out_hw)

    @torch.library.register_fake("bnorder_cpu::fold_backward")
    def _(weight, wgrad, grad_sum, scale, shift, in_hw, stride, padding, dilation, groups):
        return torch.empty_like(weight)

    @torch.library.register_fake("bnorder_cpu::update_running_stats")
    def _(running_mean, running_var, mean, var, count, momentum):
        return None

    @torch.library.register_fake("bnorder_cpu::relu_grad_batch_sum")
    def _(g, out):
        return torch.empty_like(g), g.new_empty((1, *g.shape[1:])).contiguous(
            memory_format=torch.channels_last if (g.dim() == 4 and not g.is_contiguous())
            else torch.contiguous_format)
