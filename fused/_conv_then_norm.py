"""conv → norm with the ReLU on either side: the op behind conv-bn-relu and conv-relu-bn.

Forward, y = conv(x, W) + bias, relu_mode AFTER (conv-bn-relu) or BEFORE (conv-relu-bn):

    batch statistics:   mean, var = stats(y)          one read of y (of relu(y) for BEFORE)
                        out = apply(y, s, b)          one read of y, one write
                        (s, b and the mean as in _norm: (y − mean)·s + b)
    fixed statistics:   AFTER/NONE fold into the convolution, with b' = b − mean·s:
                            out = relu(conv(x, W·s_o, bias·s + b'))     no pass over y at all
                        BEFORE cannot fold (the ReLU sits between conv and norm), nor does
                        a norm whose scale trains (below):
                            out = apply(y, s, b)

Saved for backward: x, y and the per-channel statistics; the ReLU mask is recomputed from y
(AFTER: (y − mean)·s + b > 0; BEFORE: y > 0). The folded eval path saves x and out instead of y.

Backward (see _norm for the coefficients):

    Σg', Σg'(y_in − mean) = backward_reduce(g, y)        one read of g and y
    dy = backward_apply(g, y)                            one read of g and y, one write
    dx, dW, dbias = conv_backward(dy, x, W)

Folded eval backward, g' = g·[out > 0], W' = W·s:

    dx, G = conv_backward(g', x, W')             G = wgrad(x, g')
    Σg' = channel_sum(g')                        at::sum, not oneDNN's float-accumulated bias grad
    dW = s·G     dbias = s·Σg'     dbeta = Σg'
    dgamma = rstd·Σg'·(y − mean) = rstd·(⟨G_o, W_o⟩ + (bias − mean)·Σg')
because Σ g'·conv(x, W)_o = ⟨wgrad(x, g')_o, W_o⟩: y is never rebuilt. That dgamma is exact
in real arithmetic, but its float32 rounding grows with Σ|G||W| rather than with Σ|g'·y|:
in whole networks (the affine norm in training) the norm weights' gradients were 2.5-11x
eager's error. So a norm whose scale trains (gamma requires a gradient, grad mode on) does
not fold; it keeps y and reads it, as eager does. The fold serves inference and frozen
norms, where its dgamma is not asked for.

Eager training calls on the C++ backend with batch statistics (the hot path) run the same
composition as one C++ autograd node (csrc/unit.cpp), which spares the Python of the
autograd.Function and its wrappers, about half of a unit's fixed cost per step. Everything
else (torch.compile, synchronized BN, fixed statistics, the affine norm, the other
backends) takes the custom op below.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _backend, _conv, _norm, _op
from .reference import RELU_AFTER, RELU_BEFORE


def _folds(batch_stats: bool, relu_mode: int, gamma: Optional[Tensor]) -> bool:
    """Whether fixed statistics (eval) or the affine norm fold into the convolution: not
    where the ReLU sits between them, nor where the norm's scale trains (see the module
    docstring)."""
    scale_trains = gamma is not None and gamma.requires_grad and torch.is_grad_enabled()
    return not batch_stats and relu_mode != RELU_BEFORE and not scale_trains


def _conv_norm_forward_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int],
                      padding: List[int], dilation: List[int], groups: int,
                      gamma: Optional[Tensor], beta: Optional[Tensor],
                      mean_in: Optional[Tensor], var_in: Optional[Tensor], eps: float,
                      norm: str, relu_mode: int, fold: bool, sync: int = -1
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, y, batch mean, batch var); y, mean, var are empty where not used.
    fold: _folds' answer, taken by the caller (which sees whether gamma trains).
    sync: a fused.sync key; batch statistics are then those of the whole group."""
    batch_stats = norm != "affine" and mean_in is None
    # Synchronized statistics run on the ATen convolution (the Triton one has no hook yet).
    if sync < 0 and _backend.conv_impl(x, weight, groups) == "triton":
        from .triton import ops as triton_ops
        return triton_ops.conv_norm_forward(x, weight, bias, stride, padding, dilation, gamma,
                                            beta, mean_in, var_in, eps, norm, relu_mode,
                                            fold)
    if fold:
        scale, shift, mean_c, _ = _norm.coefficients(norm, mean_in, var_in, gamma, beta, eps,
                                                     weight.shape[0], x)
        shift = _norm.affine_shift(mean_c, scale, shift)
        folded_bias = shift if bias is None else bias.to(scale.dtype) * scale + shift
        out = _conv.conv(x, _conv.scale_out_channels(weight, scale), folded_bias.to(x.dtype),
                         stride, padding, dilation, groups)
        if relu_mode == RELU_AFTER:
            out.relu_()
        empty = x.new_empty(0, dtype=torch.float64)
        return out, x.new_empty(0), empty, empty.clone()
    y = _conv.conv(x, weight, bias, stride, padding, dilation, groups)
    out, mean, var, _, _ = _norm.forward(_backend.primitives(y), y, gamma, beta, mean_in,
                                         var_in, eps, norm, relu_mode, True, sync)
    return out, y, mean, var


conv_norm_forward = torch.library.custom_op("bnorder::conv_norm_forward",
                                    _conv_norm_forward_impl, mutates_args=())


@conv_norm_forward.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, gamma, beta, mean_in, var_in, eps,
      norm, relu_mode, fold, sync=-1):
    batch_stats = norm != "affine" and mean_in is None
    y = _conv.conv(x, weight, bias, stride, padding, dilation, groups)
    stat = x.new_empty(weight.shape[0] if batch_stats else 0, dtype=torch.float64)
    if fold:
        return y, x.new_empty(0), stat, stat.clone()
    return torch.empty_like(y), y, stat, stat.clone()


def _conv_norm_backward_impl(grad: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                       y: Tensor, out: Tensor, mean: Optional[Tensor], var: Optional[Tensor],
                       gamma: Optional[Tensor], beta: Optional[Tensor], stride: List[int],
                       padding: List[int], dilation: List[int], groups: int, eps: float,
                       norm: str, relu_mode: int, batch_stats: bool, folded: bool,
                       grad_mask: List[bool], sync: int = -1
                       ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dgamma, dbeta); empty tensors for gradients not asked for."""
    if sync < 0 and _backend.conv_impl(x, weight, groups) == "triton":
        from .triton import ops as triton_ops
        return triton_ops.conv_norm_backward(grad, x, weight, bias, y, out, mean, var, gamma,
                                             beta, stride, padding, dilation, eps, norm,
                                             relu_mode, batch_stats, grad_mask, folded)
    conv_mask = grad_mask[:3]
    if folded:
        scale, _, mean_c, rstd = _norm.coefficients(norm, mean, var, gamma, beta, eps,
                                                    weight.shape[0], x)
        g = (torch.ops.aten.threshold_backward(grad, out, 0) if relu_mode == RELU_AFTER
             else grad)
        dx, wgrad, _ = _conv.conv_backward(
            g, x, _conv.scale_out_channels(weight, scale), stride, padding, dilation, groups,
            [conv_mask[0], True, False])
        sum_g = _conv.channel_sum(g).to(scale.dtype)
        wgrad_acc = wgrad.to(scale.dtype)
        dweight = _conv.scale_out_channels(wgrad, scale)
        dbias = (scale * sum_g).to(x.dtype) if conv_mask[2] else None
        bias_c = bias.to(scale.dtype) if bias is not None else torch.zeros_like(scale)
        weighted = (wgrad_acc * weight.to(scale.dtype)).flatten(1).sum(1)
        dgamma = (rstd * (weighted + (bias_c - mean_c) * sum_g)).to(scale.dtype)
        dbeta = sum_g
    else:
        grad = grad.contiguous(memory_format=_conv.memory_format_of(y))
        dy, dgamma, dbeta = _norm.backward(_backend.primitives(y), grad, y, mean, var, gamma,
                                           beta, eps, norm, relu_mode, batch_stats, True, sync)
        dx, dweight, dbias = _conv.conv_backward(dy, x, weight, stride, padding, dilation,
                                                 groups, conv_mask)
    return _op.backward_outputs(x, dx, dweight, dbias, dgamma, dbeta)


conv_norm_backward = torch.library.custom_op("bnorder::conv_norm_backward",
                                    _conv_norm_backward_impl, mutates_args=())
_conv_norm_backward_call = _op.eager_or_op(conv_norm_backward, _conv_norm_backward_impl)


@conv_norm_backward.register_fake
def _(grad, x, weight, bias, y, out, mean, var, gamma, beta, stride, padding, dilation, groups,
      eps, norm, relu_mode, batch_stats, folded, grad_mask, sync=-1):
    return _op.fake_grads(x, weight, grad_mask, weight.shape[0], _norm.acc_dtype(x))


def _setup_context(ctx, inputs, output):
    (x, weight, bias, stride, padding, dilation, groups, gamma, beta, mean_in, var_in, eps,
     norm, relu_mode, folded, sync) = inputs
    out, y, mean, var = output
    batch_stats, mean, var = _op.statistics_used(norm, mean_in, var_in, mean, var)
    # Outputs other than `out` (y, statistics) get no gradient: do not materialize zeros.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, bias, y, out if folded else None, mean, var, gamma, beta)
    ctx.args = (stride, padding, dilation, groups, eps, norm, relu_mode, batch_stats, folded,
                sync)


def _backward(ctx, grad_out, _grad_y, _grad_mean, _grad_var):
    if grad_out is None:  # only the statistics were used downstream
        return _op.no_grads(ctx)
    x, weight, bias, y, out, mean, var, gamma, beta = ctx.saved_tensors
    stride, padding, dilation, groups, eps, norm, relu_mode, batch_stats, folded, sync = ctx.args
    mask = _op.grad_mask(ctx, bias is not None)
    grads = _conv_norm_backward_call(
        grad_out, x, weight, bias, y, x.new_empty(0) if out is None else out, mean, var,
        gamma, beta, stride, padding, dilation, groups, eps, norm, relu_mode, batch_stats,
        folded, mask, sync)
    return _op.input_grads(ctx, mask, *grads, gamma, beta)


_conv_norm_forward_call = _op.with_autograd(conv_norm_forward, _conv_norm_forward_impl,
                                            _setup_context, _backward)


def forward(x, weight, bias, stride, padding, dilation, groups, gamma, beta, mean_in, var_in,
            eps, norm, relu_mode, sync=-1):
    """The order-specific step of `_unit.run`: (out, batch mean, batch var, local count)."""
    if _op.cpp_node_runs(x, norm, mean_in, sync):
        from . import _C
        out, mean, var = _C.conv_norm_train(x, weight, bias, gamma, beta, stride, padding,
                                            dilation, groups, eps, _norm.NORM_CODES[norm],
                                            relu_mode)
        return out, mean, var, out.numel() // out.shape[1]
    batch_stats = norm != "affine" and mean_in is None
    out, _y, mean, var = _conv_norm_forward_call(x, weight, bias, stride, padding, dilation,
                                                 groups, gamma, beta, mean_in, var_in, eps,
                                                 norm, relu_mode,
                                                 _folds(batch_stats, relu_mode, gamma), sync)
    return out, mean, var, out.numel() // out.shape[1]
