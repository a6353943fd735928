"""The order ops on the fused Triton convolution (conv_impl "triton"): the bodies that
fused/_conv_then_norm.py and fused/bn_conv_relu.py run instead of their ATen-convolution
versions. Same arguments, same outputs, same saved tensors, so autograd, the fake
implementations and torch.compile see no difference.

The norm is centered, norm(t) = (t − mean)·s + shift (fused/_norm.py), wherever it runs on
a tensor in memory (apply, backward_reduce, backward_apply and the dy prologue, which
evaluate the same expression so that the ReLU mask is the forward's). The convolution's
epilogue (APPLY_OUT, eval folds) and prologue (NORM_INPUT) keep the affine form t·s + b
with b = _norm.affine_shift(mean, s, shift), rounded once from float64: the prologue loads
its per-channel vectors at every K-step of the GEMM's inner loop, and centered it would
load one more and subtract once more per element; and on this path the mean is the float32
one of the Triton statistics anyway (primitives.py), not the float64 mean that makes the
centered form exact far from zero in the C++ backend.

Batch statistics are returned as float64 (the Triton float32 ones widened exactly), as
every backend's ops return them; the backward accepts them (or running statistics) in
either dtype and rounds the mean to the accumulation dtype through _norm.coefficients.

conv → norm (conv-bn-relu: relu_mode 1, conv-relu-bn: relu_mode 2, no ReLU: 0)

    training  y, (n, m, M2) partials = conv(x, W) + bias     stats of y / relu(y) in the epilogue
              mean, var = merge(partials);  out = apply(y)   one read of y, one write
    eval      relu_mode 0/1: out = act(conv(x, W)·s + b)     the norm in the epilogue, no y;
                             b = affine_shift(mean, s, shift)
              relu_mode 2:   y = conv(x, W);  out = apply(y)
    backward  Σg', Σg'(y_in − mean) = backward_reduce(g, y)
              dx = dgrad(ĝ, W),  dW, dbias = wgrad(ĝ, x)      ĝ = backward_apply(g, y) formed on
                                                             load in both: dy is never stored
    folded eval backward, g' = g·[out > 0] on load:
              dx = dgrad(g', W·s);  G, Σg' = wgrad(g', x);  dW = s·G;  dbias = s·Σg'
              dgamma = rstd·(⟨G_o, W_o⟩ + (bias − mean)·Σg')   (as in _conv_then_norm)

norm → conv (bn-conv-relu)

    forward   mean, var = stats(x) (training);  a = relu(conv(x̃, W) + bias) with
              x̃ = x·s + b formed on load, 0 in the padding        norm(x) never stored
              (b = affine_shift(mean, s, shift))
    backward  dn, (Σdn, Σdn(x − mean)) = dgrad(g·[a > 0], W)   backward_reduce in the epilogue
              dW, dbias = wgrad(g·[a > 0], x̃)                   x̃ again formed on load
              dx = backward_apply(dn, x)
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _conv, _norm, _op
from ..reference import RELU_AFTER, RELU_BEFORE, RELU_NONE
from . import _common, conv as C, primitives as P


# The dtype of the batch statistics the ops return, for every backend (the fakes in
# fused/_conv_then_norm.py and fused/bn_conv_relu.py say the same).
STATS_DTYPE = torch.float64


def _empty_stat(x: Tensor) -> Tensor:
    return x.new_empty(0, dtype=STATS_DTYPE)


def _batch_stats(mean: Tensor, var: Tensor):
    """The Triton statistics (float32, float64 for float64 activations) as the ops return
    them: float64, widened exactly."""
    return mean.to(STATS_DTYPE), var.to(STATS_DTYPE)


def conv_norm_forward(x, weight, bias, stride, padding, dilation, gamma, beta, mean_in,
                      var_in, eps, norm, relu_mode, folds: bool):
    """(out, y, batch mean, batch var) as bnorder::conv_norm_forward returns them."""
    channels = weight.shape[0]
    batch_stats = norm != "affine" and mean_in is None
    if folds:
        scale, shift, mean_c, _ = _norm.coefficients(norm, mean_in, var_in, gamma, beta, eps,
                                                     channels, x)
        # The epilogue stays affine (module docstring): y·s + (shift − mean·s).
        out, _ = C.conv_forward(x, weight, bias, stride, padding, dilation, out_scale=scale,
                                out_shift=_norm.affine_shift(mean_c, scale, shift),
                                relu=relu_mode == RELU_AFTER)
        return out, x.new_empty(0), _empty_stat(x), _empty_stat(x)
    stats_mode = (2 if relu_mode == RELU_BEFORE else 1) if batch_stats else 0
    y, parts = C.conv_forward(x, weight, bias, stride, padding, dilation,
                              stats_mode=stats_mode)
    mean, var = P.merge_moments(*parts) if batch_stats else (mean_in, var_in)
    scale, shift, mean_c, _ = _norm.coefficients(norm, mean, var, gamma, beta, eps, channels,
                                                 x)
    out = P.apply(y, mean_c, scale, shift, relu_mode)
    if not batch_stats:
        return out, y, _empty_stat(x), _empty_stat(x)
    return (out, y, *_batch_stats(mean, var))


def conv_norm_backward(grad, x, weight, bias, y, out, mean, var, gamma, beta, stride, padding,
                       dilation, eps, norm, relu_mode, batch_stats, grad_mask, folds: bool):
    """(dx, dweight, dbias, dgamma, dbeta) as bnorder::conv_norm_backward returns them."""
    channels = weight.shape[0]
    scale, shift, mean_c, rstd = _norm.coefficients(norm, mean, var, gamma, beta, eps,
                                                    channels, x)
    geometry = (stride, padding, dilation)
    dx = dweight = dbias = None
    if folds:
        mask = dict(prologue=2, saved=out) if relu_mode == RELU_AFTER else {}
        if grad_mask[0]:
            dx, _ = C.conv_input_grad(grad, _conv.scale_out_channels(weight, scale), x,
                                      *geometry, **mask)
        wgrad, sum_g = C.conv_weight_grad(grad, x, weight, *geometry, **mask)
        wgrad_acc = wgrad.to(scale.dtype)
        if grad_mask[1]:
            dweight = _conv.scale_out_channels(wgrad, scale)
        if grad_mask[2]:
            dbias = (scale * sum_g).to(x.dtype)
        bias_c = bias.to(scale.dtype) if bias is not None else torch.zeros_like(scale)
        weighted = (wgrad_acc * weight.to(scale.dtype)).flatten(1).sum(1)
        dgamma = rstd * (weighted + (bias_c - mean_c) * sum_g)
        return _op.backward_outputs(x, dx, dweight, dbias, dgamma, sum_g)
    grad = grad.contiguous(memory_format=_common.memory_format(y))
    sum_g, sum_gtc = P.backward_reduce(grad, y, mean_c, scale, shift, relu_mode)
    k1, k2, k3, dgamma, dbeta = _norm.backward_coefficients(sum_g, sum_gtc, scale, rstd,
                                                            y.numel() // channels, batch_stats)
    fused_dy = dict(prologue=1, saved=y, vectors=(mean_c, scale, shift, k1, k2, k3),
                    relu_mode=relu_mode)
    if grad_mask[0]:
        dx, _ = C.conv_input_grad(grad, weight, x, *geometry, **fused_dy)
    if grad_mask[1] or grad_mask[2]:
        dweight, db = C.conv_weight_grad(grad, x, weight, *geometry, **fused_dy)
        dbias = db.to(x.dtype) if grad_mask[2] else None
        dweight = dweight if grad_mask[1] else None
    return _op.backward_outputs(x, dx, dweight, dbias, dgamma, dbeta)


def norm_conv_forward(x, weight, bias, stride, padding, dilation, gamma, beta, mean_in,
                      var_in, eps, norm, relu):
    """(out, batch mean, batch var) as bnorder::norm_conv_forward returns them."""
    batch_stats = norm != "affine" and mean_in is None
    mean, var = P.stats(x, RELU_NONE) if batch_stats else (mean_in, var_in)
    scale, shift, mean_c, _ = _norm.coefficients(norm, mean, var, gamma, beta, eps,
                                                 x.shape[1], x)
    # The prologue stays affine (module docstring): x̃ = x·s + (shift − mean·s).
    out, _ = C.conv_forward(x, weight, bias, stride, padding, dilation, in_scale=scale,
                            in_shift=_norm.affine_shift(mean_c, scale, shift), relu=relu)
    if not batch_stats:
        return out, _empty_stat(x), _empty_stat(x)
    return (out, *_batch_stats(mean, var))


def norm_conv_backward(grad, x, out, weight, mean, var, gamma, beta, stride, padding, dilation,
                       eps, norm, relu, batch_stats, grad_mask):
    """(dx, dweight, dbias, dgamma, dbeta) as bnorder::norm_conv_backward returns them."""
    channels = x.shape[1]
    scale, shift, mean_c, rstd = _norm.coefficients(norm, mean, var, gamma, beta, eps,
                                                    channels, x)
    geometry = (stride, padding, dilation)
    mask = dict(prologue=2 if relu else 0, saved=out if relu else None)
    dnorm, (sum_g, sum_gtc) = C.conv_input_grad(grad, weight, x, *geometry, **mask,
                                                reduce_mean=mean_c)
    dweight = dbias = dx = None
    if grad_mask[1] or grad_mask[2]:
        # x̃ as the forward formed it: the same b, from the mean as the forward rounded it.
        dweight, db = C.conv_weight_grad(grad, x, weight, *geometry, **mask, in_scale=scale,
                                         in_shift=_norm.affine_shift(mean_c, scale, shift))
        dbias = db.to(x.dtype) if grad_mask[2] else None
        dweight = dweight if grad_mask[1] else None
    k1, k2, k3, dgamma, dbeta = _norm.backward_coefficients(sum_g, sum_gtc, scale, rstd,
                                                            x.numel() // channels, batch_stats)
    if grad_mask[0]:
        dx = P.backward_apply(dnorm, x, mean_c, scale, shift, k1, k2, k3, RELU_NONE)
    return _op.backward_outputs(x, dx, dweight, dbias, dgamma, dbeta)
