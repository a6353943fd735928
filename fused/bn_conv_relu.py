"""bn-conv-relu: a = relu(conv(norm(x), W) + bias), without ever materializing norm(x).

Forward. With norm(x) = (x − mean_c)·s_c + shift_c = x·s_c + b_c, b_c = shift_c − mean_c·s_c
(_norm.affine_shift), and zero padding applied *after* the norm,

    conv(norm(x), W) = conv(x, W·s) + conv(B, W)

where W·s scales each weight by the scale of the input channel it reads and B is the
1×C×H×W image holding b_c (the padding stays 0). The border map conv(B, W) is one image,
broadcast over the batch. B is constant inside its borders, so the map needs no
convolution: tap (k, l) of output pixel (i, j) reads inside the image or in the padding,
independently along each axis, and

    conv(B, W)[o, i, j] = Σ_{k,l} v[o, k, l]·inside_h[i, k]·inside_w[j, l]
    v[o, k, l] = Σ_c W[o, c, k, l]·b_c

a few weight-sized sums (_conv.fold_forward; csrc/fold.cpp on the C++ backend), where a
batch-1 convolution would take ATen's slow path:

    mean, var = stats(x)                      one read of x (training only)
    z = conv(x, W·s, bias) + conv(B, W)       the norm costs no pass over any activation
    a = relu(z)                               in place

Saved for backward: x, the statistics and a (the ReLU mask is a > 0; a is the next layer's
input, so it is stored anyway).

Backward, g_z = g·[a > 0], u[o, k, l] = Σ_{i,j} Σ_n g_z[o, i, j]·inside_h[i, k]·inside_w[j, l]
(the gradient each weight tap carried from inside the image):

    g_z, Σ_n g_z = relu_grad_batch_sum(g, a)         one pass, as the ReLU backward alone
    dn, G, dbias = conv_backward(g_z, x, W)          dn = ∂L/∂norm(x), G = wgrad(x, g_z)
    dW = s·G + b_c·u                                 the border map's term is wgrad(B, Σ_n g_z)
    Σdn, Σdn·(x − mean) = backward_reduce(dn, x)     one read of dn and x
    dx = backward_apply(dn, x)                       coefficients as in _norm

The norm's two sums could also be had without reading dn, from the weight side:
Σdn_c = Σ_{o,k,l} W·u and Σdn·x_c = Σ_{o,k,l} W[o, c]·G[o, c]. That is exact in real
arithmetic, but in float32 its rounding grows with Σ|W||G| rather than with Σ|dn·x̂|, and
Σdn·(x − mean) = Σdn·x − mean·Σdn cancels with |mean|/std: the norm-parameter gradients
were 3-5x eager's error in whole networks (ResNet-20's stem at batch 16: dgamma 2.5e-5
against eager's 5.0e-6, on 3.7). So the sums are read from dn, as eager reads them, and dn
is computed wherever x or the norm's parameters need a gradient (for a network's first unit
with bn-minus, nothing needs it and it is skipped). With fixed statistics (eval) or the
affine norm and no norm parameter to train, dx = s·dn, which is the convolution's own
input gradient for the weight W·s: then there is no pass over dn at all.

Eval mode is the same computation with running statistics: the norm folds into the conv
weights plus the border map conv(B, W).

When the fold is not used. It is exact in real arithmetic, but x·s and b cancel inside
the convolution's sum instead of element by element, so in floating point its error grows
with |mean|/std of the input. The inputs of a network's later units are ReLU outputs, with
|mean|/std ≈ 1.3, where the fold costs a few tenths of a bit: in ResNet-34 (width 0.25,
batch 16, seed 0) each unit's output carries 1.3x eager's rms rounding error with the fold
and 1.0x with the norm applied explicitly, and the network's gradients ~1.3x eager's. That
is within DESIGN §6's bound, and the price of never writing norm(x). Far from zero the
cost grows past it, and in float16/bfloat16 the extra roundings of W·s and of two weight
gradients cost more than eager's single rounding. In those cases (16-bit activations, or
|mean_c|·rstd_c > FOLD_MAX_MEAN_OVER_STD for some channel) — and where the weight is
larger than the activation, so that rescaling it costs more than a pass over norm(x) (wide
fully connected units) — the norm is applied explicitly, n = apply(x), convolved and dropped; backward recomputes n instead of
storing it, so norm(x) is still never kept between forward and backward.

Eager training calls with batch statistics on the C++ backend (float32/float64) run this
composition, fold or explicit norm alike, as one C++ autograd node (csrc/unit.cpp), which
spares the Python of the autograd.Function and its wrappers; the op below serves the rest.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _backend, _conv, _norm, _op, _unit
from .reference import RELU_NONE


FOLD_MAX_MEAN_OVER_STD = 100.0


def _folds(prims, x: Tensor, weight: Tensor, norm: str, mean: Optional[Tensor],
           var: Optional[Tensor], eps: float) -> bool:
    """Whether to use conv(x, W·s) + conv(B, W) rather than conv(norm(x), W).

    The fold rescales the weight (forward) and its gradient (backward) instead of writing
    and re-reading norm(x): cheaper only while the weight is smaller than the activation
    (true of convolutions, not of wide fully connected units such as 4096 -> 4096), and as
    accurate as eager only for 32/64-bit data not far from zero (see above)."""
    if x.dtype not in (torch.float32, torch.float64) or weight.numel() > x.numel():
        return False
    if norm == "affine":  # mean 0, std 1
        return True
    if hasattr(prims, "fold_exact"):  # one C++ call (csrc/fold.cpp) instead of six tensor ops
        return prims.fold_exact(mean, var, eps, FOLD_MAX_MEAN_OVER_STD)
    # |mean|·rstd <= limit, without the square root; NaN statistics do not fold.
    return bool((mean.square() <= (var + eps) * FOLD_MAX_MEAN_OVER_STD ** 2).all())


def _fold_ops(prims):
    """The backend's fold_forward / fold_backward, or their torch composition (_conv)."""
    return prims if hasattr(prims, "fold_forward") else _conv


def _border_ops(prims):
    """The backend's add_map_relu / relu_grad_batch_sum, or the torch reference."""
    return prims if hasattr(prims, "add_map_relu") else _backend.primitives_reference()


def _norm_conv_forward_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int],
                      padding: List[int], dilation: List[int], groups: int,
                      gamma: Optional[Tensor], beta: Optional[Tensor],
                      mean_in: Optional[Tensor], var_in: Optional[Tensor], eps: float,
                      norm: str, relu: bool, sync: int = -1) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (out, batch mean, batch var); mean and var are empty where not computed.
    sync: a fused.sync key; batch statistics are then those of the whole group."""
    # Synchronized statistics run on the ATen convolution (the Triton one has no hook yet).
    if sync < 0 and _backend.conv_impl(x, weight, groups) == "triton":
        from .triton import ops as triton_ops
        return triton_ops.norm_conv_forward(x, weight, bias, stride, padding, dilation, gamma,
                                            beta, mean_in, var_in, eps, norm, relu)
    batch_stats = norm != "affine" and mean_in is None
    prims = _backend.primitives(x)
    _, mean, var, _, _ = _norm.forward(prims, x, gamma, beta, mean_in, var_in, eps, norm,
                                       RELU_NONE, False, sync)
    used = (mean, var) if batch_stats else (mean_in, var_in)
    # The coefficients exactly as the backward forms them (the mean it centers on included),
    # so that the backward's recomputed norm(x) is the forward's.
    scale, shift, center, _ = _norm.coefficients(norm, *used, gamma, beta, eps, x.shape[1], x,
                                                 prims)
    if _folds(prims, x, weight, norm, *used, eps):
        out_hw = _norm.conv_output_hw(x, weight, stride, padding, dilation)
        scaled_weight, border = _fold_ops(prims).fold_forward(
            weight, scale.to(weight.dtype), _norm.affine_shift(center, scale, shift).to(weight.dtype),
            x.shape[2:], out_hw, stride, padding, dilation, groups)
        z = _conv.conv(x, scaled_weight, bias, stride, padding, dilation, groups)
        z = _border_ops(prims).add_map_relu(z, border, relu)  # one pass
    else:
        z = _conv.conv(prims.apply(x, center, scale, shift, RELU_NONE), weight, bias, stride,
                       padding, dilation, groups)
        if relu:
            z.relu_()
    return z, mean, var


norm_conv_forward = torch.library.custom_op("bnorder::norm_conv_forward",
                                    _norm_conv_forward_impl, mutates_args=())


@norm_conv_forward.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, gamma, beta, mean_in, var_in, eps,
      norm, relu, sync=-1):
    batch_stats = norm != "affine" and mean_in is None
    stat = x.new_empty(x.shape[1] if batch_stats else 0, dtype=torch.float64)
    return _conv.conv(x, weight, bias, stride, padding, dilation, groups), stat, stat.clone()


def _norm_conv_backward_impl(grad: Tensor, x: Tensor, out: Tensor, weight: Tensor,
                       mean: Optional[Tensor], var: Optional[Tensor], gamma: Optional[Tensor],
                       beta: Optional[Tensor], stride: List[int], padding: List[int],
                       dilation: List[int], groups: int, eps: float, norm: str, relu: bool,
                       batch_stats: bool, grad_mask: List[bool], sync: int = -1
                       ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dgamma, dbeta); empty tensors for gradients not asked for."""
    if sync < 0 and _backend.conv_impl(x, weight, groups) == "triton":
        from .triton import ops as triton_ops
        return triton_ops.norm_conv_backward(grad, x, out, weight, mean, var, gamma, beta,
                                             stride, padding, dilation, eps, norm, relu,
                                             batch_stats, grad_mask)
    prims = _backend.primitives(x)
    scale, shift, mean_c, _ = _norm.coefficients(norm, mean, var, gamma, beta, eps,
                                                 x.shape[1], x, prims)
    folds = _folds(prims, x, weight, norm, mean, var, eps)
    need_x, need_w, need_b, need_gamma, need_beta = grad_mask
    # With fixed statistics (eval) or the affine norm and no norm parameter to train,
    # dx = s·dn is the convolution's input gradient for the weight W·s: it comes out of the
    # convolution itself, with no pass over dn and x. (The weight gradient does not depend
    # on the weight the convolution is given.)
    dx_from_conv = folds and need_x and not batch_stats and not (need_gamma or need_beta)
    # Otherwise dn = ∂L/∂norm(x) feeds the norm's backward wherever x or the norm's
    # parameters need a gradient: backward_reduce(dn, x) for its sums, backward_apply for dx.
    need_dn = (need_x and not dx_from_conv) or need_gamma or need_beta
    # Folded, the weight gradient is s·wgrad(x, g_z) plus the border term, from Σ_n g_z.
    fold_wgrad = folds and need_w
    g_batch_sum = None
    if relu and fold_wgrad:
        # Σ_n g_z, for the border taps, taken in the ReLU-mask pass.
        g, g_batch_sum = _border_ops(prims).relu_grad_batch_sum(
            grad.contiguous(memory_format=_conv.memory_format_of(out)), out)
    else:
        g = torch.ops.aten.threshold_backward(grad, out, 0) if relu else grad
    conv_input = x if folds else prims.apply(x, mean_c, scale, shift, RELU_NONE)
    conv_weight = weight
    if folds:
        border_shift = _norm.affine_shift(mean_c, scale, shift).to(weight.dtype)
    if dx_from_conv:
        conv_weight, _ = _fold_ops(prims).fold_forward(
            weight, scale.to(weight.dtype), border_shift, x.shape[2:], g.shape[2:],
            stride, padding, dilation, groups)
    dnorm, dweight, dbias = _conv.conv_backward(
        g, conv_input, conv_weight, stride, padding, dilation, groups,
        [need_dn or dx_from_conv, need_w, need_b])
    if fold_wgrad:
        if g_batch_sum is None:
            g_batch_sum = _conv.batch_sum(g)
        dweight = _fold_ops(prims).fold_backward(
            weight, dweight, g_batch_sum, scale.to(weight.dtype), border_shift,
            x.shape[2:], stride, padding, dilation, groups)
    dx = dgamma = dbeta = None
    if dx_from_conv:
        dx = dnorm
    elif need_dn:
        dnorm = dnorm.contiguous(memory_format=_conv.memory_format_of(x))
        dx, dgamma, dbeta = _norm.backward(prims, dnorm, x, mean, var, gamma, beta, eps, norm,
                                           RELU_NONE, batch_stats, need_x, sync)
    if dgamma is None:  # not asked for; the op's outputs keep their shapes
        dgamma = x.new_zeros(x.shape[1], dtype=_norm.acc_dtype(x))
        dbeta = torch.zeros_like(dgamma)
    return _op.backward_outputs(x, dx, dweight, dbias, dgamma, dbeta)


norm_conv_backward = torch.library.custom_op("bnorder::norm_conv_backward",
                                    _norm_conv_backward_impl, mutates_args=())
_norm_conv_backward_call = _op.eager_or_op(norm_conv_backward, _norm_conv_backward_impl)


@norm_conv_backward.register_fake
def _(grad, x, out, weight, mean, var, gamma, beta, stride, padding, dilation, groups, eps,
      norm, relu, batch_stats, grad_mask, sync=-1):
    return _op.fake_grads(x, weight, grad_mask, x.shape[1], _norm.acc_dtype(x))


def _setup_context(ctx, inputs, output):
    (x, weight, bias, stride, padding, dilation, groups, gamma, beta, mean_in, var_in, eps,
     norm, relu, sync) = inputs
    out, mean, var = output
    batch_stats, mean, var = _op.statistics_used(norm, mean_in, var_in, mean, var)
    # Outputs other than `out` (y, statistics) get no gradient: do not materialize zeros.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, out if relu else None, weight, mean, var, gamma, beta)
    ctx.args = (stride, padding, dilation, groups, eps, norm, relu, batch_stats,
                bias is not None, sync)


def _backward(ctx, grad_out, _grad_mean, _grad_var):
    if grad_out is None:  # only the statistics were used downstream
        return _op.no_grads(ctx)
    x, out, weight, mean, var, gamma, beta = ctx.saved_tensors
    stride, padding, dilation, groups, eps, norm, relu, batch_stats, has_bias, sync = ctx.args
    mask = _op.grad_mask(ctx, has_bias)
    grads = _norm_conv_backward_call(
        grad_out, x, x.new_empty(0) if out is None else out, weight, mean, var, gamma, beta,
        stride, padding, dilation, groups, eps, norm, relu, batch_stats, mask, sync)
    return _op.input_grads(ctx, mask, *grads, gamma, beta)


_norm_conv_forward_call = _op.with_autograd(norm_conv_forward, _norm_conv_forward_impl,
                                            _setup_context, _backward)


def _forward(x, weight, bias, stride, padding, dilation, groups, gamma, beta, mean_in, var_in,
             eps, norm, relu_mode, sync=-1):
    if (_op.cpp_node_runs(x, norm, mean_in, sync)
            and x.dtype in (torch.float32, torch.float64)):
        # The same composition as one C++ autograd node (csrc/unit.cpp).
        from . import _C
        out, mean, var = _C.norm_conv_train(x, weight, bias, gamma, beta, stride, padding,
                                            dilation, groups, eps, _norm.NORM_CODES[norm],
                                            relu_mode != RELU_NONE, FOLD_MAX_MEAN_OVER_STD)
        return out, mean, var, x.numel() // x.shape[1]
    out, mean, var = _norm_conv_forward_call(x, weight, bias, stride, padding, dilation,
                                             groups, gamma, beta, mean_in, var_in, eps, norm,
                                             relu_mode != RELU_NONE, sync)
    return out, mean, var, x.numel() // x.shape[1]


bn_conv_relu = _unit.functional("bn-conv-relu", _forward, "relu(conv2d(norm(input)))")
