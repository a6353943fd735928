"""The norm algebra shared by every order and every backend.

Every order reduces its norm to per-channel coefficients around the four primitives:

forward (DESIGN §2), with t the tensor the norm sees:

    batch statistics:  mean_c, var_c = stats(t)          rstd_c = 1/sqrt(var_c + eps)
    bn:        s_c = gamma_c·rstd_c     b_c = beta_c
    bn-minus:  s_c = rstd_c             b_c = 0
    affine:    s_c = gamma_c            b_c = beta_c     mean_c = 0   (no statistics)
    norm(t) = (t − mean_c)·s_c + b_c

The norm is defined centered, not as t·s_c + (b_c − mean_c·s_c) (ATen's form): far from zero
(|mean| >> std) the affine form's shift cannot be nearer than half an ulp of mean·s, an
offset on every value of a channel that no later rounding removes (on data of mean 1e4 and
std 1, 5e-4, which dominates the next convolution's weight gradient). The batch statistics
are therefore float64. The C++ passes evaluate it as ATen's t·s + b plus the rest of the
shift from the float64 mean where |mean|/std is large (csrc/norm.cpp, kExactShiftAbove;
csrc/primitives.cpp, ChannelTerms); the reference and Triton passes as written.
Where the affine form is needed (the folds of bn-conv-relu and of eval-mode conv-bn-relu,
the Triton convolution's prologue and epilogue) `affine_shift` gives its b.

backward, with g' the gradient at the norm's output (ReLU mask applied) and t̂ = (t − mean)·rstd:

    Σg' and Σg'·(t − mean) = backward_reduce(g, t)
    dbeta = Σg'                 dgamma = rstd·Σg'·(t − mean) = Σg'·t̂
    batch statistics:  dt = s·(g' − dbeta/M − t̂·dgamma/M)
                          = g'·k1 + (t − mean)·k2 + k3,
                       k1 = s,  k2 = −s·rstd²·Σg'(t − mean)/M,  k3 = −s·Σg'/M
    fixed statistics (eval) or affine:  k1 = s, k2 = k3 = 0.

``backward_apply`` evaluates the last line, so one formula serves training, eval, bn,
bn-minus and affine alike.

`forward` and `backward` compose the primitives with this algebra, once for every order and
backend. A backend may supply the whole composition as one call (the C++ backend does, in
csrc/norm.cpp: the per-channel algebra in between is then a loop over C values instead of
a dozen tensor ops of a few microseconds each); synchronized BN always takes the composed
path, since its statistics and sums are merged across processes between the passes.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _backend
from .reference import NORMS

NORM_CODES = {"bn": 0, "bn-minus": 1, "affine": 2}


def uses_batch_stats(norm: str, training: bool, running_mean: Optional[Tensor]) -> bool:
    """nn.BatchNorm2d's rule: batch statistics in training, or when no running stats exist."""
    return norm in ("bn", "bn-minus") and (training or running_mean is None)


def rstd_of(var: Tensor, eps: float) -> Tensor:
    return (var + eps).rsqrt_()


def acc_dtype(t: Tensor) -> torch.dtype:
    """The accumulation dtype of the statistics and coefficients for activations t."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def coefficients(norm: str, mean: Optional[Tensor], var: Optional[Tensor],
                 gamma: Optional[Tensor], beta: Optional[Tensor], eps: float,
                 channels: int, like: Tensor, prims=None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(scale, shift, mean, rstd) per-channel: norm(t) = (t − mean)·scale + shift. scale,
    shift and rstd in the accumulation dtype, mean in float64 (the passes center on it with
    all its digits); computed by `prims` when that backend has its own `coefficients`.

    For the affine norm mean = 0 and rstd = 1, so that the same backward formula gives
    dgamma = Σg'·t."""
    acc = acc_dtype(like)
    if prims is not None and hasattr(prims, "coefficients"):
        return prims.coefficients(mean, var, gamma, beta, eps, NORM_CODES[norm], channels, acc)
    if norm == "affine":
        zeros = torch.zeros(channels, dtype=torch.float64, device=like.device)
        return gamma.to(acc), beta.to(acc), zeros, torch.ones(channels, dtype=acc,
                                                               device=like.device)
    # In float64, each coefficient rounded once (csrc/norm.cpp's coefficients_of says why:
    # s_c is one relative error on the whole channel, which later layers sum in phase).
    # Few, fused per-channel ops: each costs microseconds of dispatch, per unit and step.
    wide = torch.float64
    rstd = rstd_of(var.to(wide), eps)
    scale = rstd * gamma.to(wide) if norm == "bn" else rstd
    shift = beta.to(acc) if norm == "bn" else torch.zeros(channels, dtype=acc,
                                                           device=like.device)
    return scale.to(acc), shift, mean.to(wide, copy=True), rstd.to(acc)


def affine_shift(mean: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """b_c = shift_c − mean_c·s_c, the norm as t·s_c + b_c, in float64 from the scale as
    rounded and rounded once to its dtype: for the passes that cannot center (the folds into
    a convolution's weights and bias, the Triton convolution's prologue and epilogue)."""
    wide = torch.float64
    return (shift.to(wide) - mean.to(wide) * scale.to(wide)).to(scale.dtype)


def backward_coefficients(sum_g: Tensor, sum_gtc: Tensor, scale: Tensor, rstd: Tensor,
                          count: int, batch_stats: bool):
    """(k1, k2, k3, dgamma, dbeta) from the two backward sums, in float64 and rounded once
    to the sums' dtype: k2 and k3 are per-channel factors of the whole channel's gradient."""
    acc, wide = sum_g.dtype, torch.float64
    rstd_w = rstd.to(wide)
    dgamma = sum_gtc.to(wide) * rstd_w
    if not batch_stats:
        zeros = torch.zeros_like(scale)
        return scale, zeros, zeros, dgamma.to(acc), sum_g
    scale_w = scale.to(wide)
    k2 = (scale_w * rstd_w).mul_(dgamma).mul_(-1.0 / count)
    k3 = (scale_w * sum_g.to(wide)).mul_(-1.0 / count)
    return scale, k2.to(acc), k3.to(acc), dgamma.to(acc), sum_g


def forward(prims, t: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor],
            mean_in: Optional[Tensor], var_in: Optional[Tensor], eps: float, norm: str,
            relu_mode: int, apply: bool, sync: int = -1):
    """(out, mean, var, scale, shift): the norm of t with the ReLU placed by relu_mode.

    Batch statistics unless running ones are given (mean_in/var_in) or the norm is affine;
    mean and var are the batch statistics in float64, empty when none were taken. out is empty unless
    `apply` (bn-conv-relu folds the norm into its convolution and needs only s and b).
    sync: a fused.sync key; the statistics are then those of the whole group."""
    if sync < 0 and hasattr(prims, "norm_forward"):
        return prims.norm_forward(t, gamma, beta, mean_in, var_in, eps, NORM_CODES[norm],
                                  relu_mode, apply)
    channels = t.shape[1]
    batch_stats = norm != "affine" and mean_in is None
    if batch_stats and sync >= 0:
        from . import sync as _sync
        # The merge's between-process term needs each process's mean to more digits than
        # float32 keeps when |mean| >> std: the backend's float64 statistics where it has them.
        exact_stats = getattr(prims, "exact_stats", prims.stats)
        mean, var = _sync.merge_stats(sync, *exact_stats(t, relu_mode), t.numel() // channels)
    elif batch_stats:
        mean, var = getattr(prims, "exact_stats", prims.stats)(t, relu_mode)
    else:
        mean, var = mean_in, var_in
    # The backend's own coefficients where it has them: its passes expect the mean as its
    # coefficients give it (csrc/norm.cpp decides per channel which digits it keeps).
    scale, shift, mean_c, _ = coefficients(norm, mean, var, gamma, beta, eps, channels, t,
                                           prims)
    out = prims.apply(t, mean_c, scale, shift, relu_mode) if apply else t.new_empty(0)
    if batch_stats:
        mean, var = mean.to(torch.float64), var.to(torch.float64)
    else:
        mean, var = t.new_empty(0, dtype=torch.float64), t.new_empty(0, dtype=torch.float64)
    return out, mean, var, scale, shift


def backward(prims, g: Tensor, t: Tensor, mean: Optional[Tensor], var: Optional[Tensor],
             gamma: Optional[Tensor], beta: Optional[Tensor], eps: float, norm: str,
             relu_mode: int, batch_stats: bool, input_grad: bool, sync: int = -1):
    """(dt, dgamma, dbeta) for the gradient g at the output of `forward`; dt is None unless
    `input_grad`. mean and var: the statistics the forward normalized with."""
    if sync < 0 and hasattr(prims, "norm_backward"):
        dt, dgamma, dbeta = prims.norm_backward(g, t, mean, var, gamma, beta, eps,
                                                NORM_CODES[norm], relu_mode, batch_stats,
                                                input_grad)
        return (dt if input_grad else None), dgamma, dbeta
    channels = t.shape[1]
    scale, shift, mean_c, rstd = coefficients(norm, mean, var, gamma, beta, eps, channels, t,
                                              prims)
    sum_g, sum_gtc = prims.backward_reduce(g, t, mean_c, scale, shift, relu_mode)
    count = t.numel() // channels
    if sync >= 0 and batch_stats:
        from . import sync as _sync
        k1, k2, k3, dgamma, dbeta = _sync.backward_coefficients(sync, sum_g, sum_gtc, scale,
                                                                rstd, count)
    else:
        k1, k2, k3, dgamma, dbeta = backward_coefficients(sum_g, sum_gtc, scale, rstd, count,
                                                          batch_stats)
    dt = (prims.backward_apply(g, t, mean_c, scale, shift, k1, k2, k3, relu_mode)
          if input_grad else None)
    return dt, dgamma, dbeta


def update_running_stats(running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         mean: Tensor, var: Tensor, count: int, momentum: float) -> None:
    """nn.BatchNorm2d's update: exponential average with the unbiased batch variance."""
    if running_mean is None:
        return
    if (not torch.compiler.is_compiling() and running_mean.device.type == "cpu"
            and _backend.name_for(running_mean.device) == "cpp"):
        # One call instead of three tensor ops (csrc/norm.cpp), same formula.
        torch.ops.bnorder_cpu.update_running_stats(running_mean, running_var, mean, var,
                                                   count, momentum)
        return
    with torch.no_grad():
        unbiased = var * (count / (count - 1))
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_var.lerp_(unbiased.to(running_var.dtype), momentum)


def conv_output_hw(x: Tensor, weight: Tensor, stride, padding, dilation) -> Tuple[int, int]:
    """F.conv2d's output height and width."""
    return tuple((x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1)
                 // stride[i] + 1 for i in range(2))


def check_unit_inputs(op: str, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                      stride, padding, dilation, groups: int, norm: str, norm_channels_of: str,
                      running_mean: Optional[Tensor], running_var: Optional[Tensor],
                      norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
                      training: bool) -> int:
    """Validate a unit's arguments with messages that name the problem; returns the
    number of channels the norm sees."""
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise TypeError(f"{op}: input and weight must be tensors")
    if x.dim() != 4:
        raise ValueError(f"{op}: expected a 4-D input (N, C, H, W), got {x.dim()}-D "
                         f"input of size {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"{op}: expected a 4-D conv weight (out, in/groups, kH, kW), got "
                         f"size {tuple(weight.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{op}: input must be a floating-point tensor, got {x.dtype}")
    if x.dtype != weight.dtype:
        raise ValueError(f"{op}: input dtype {x.dtype} and weight dtype {weight.dtype} differ")
    if groups < 1 or x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"{op}: input has {x.shape[1]} channels but the conv weight expects "
                         f"{weight.shape[1] * groups} (weight {tuple(weight.shape)}, "
                         f"groups={groups})")
    if weight.shape[0] % groups:
        raise ValueError(f"{op}: out_channels {weight.shape[0]} is not divisible by "
                         f"groups={groups}")
    if norm not in NORMS:
        raise ValueError(f"{op}: unknown norm {norm!r}; expected one of {NORMS}")
    channels = x.shape[1] if norm_channels_of == "input" else weight.shape[0]
    # Called per unit and step: cheap tests first, the messages only on failure.
    tensors = (("weight", weight), ("bias", bias), ("running_mean", running_mean),
               ("running_var", running_var), ("norm_weight", norm_weight),
               ("norm_bias", norm_bias))
    on_cpu = x.is_cpu
    for name, t in tensors:
        if t is not None and (t.is_cpu != on_cpu or (not on_cpu and t.device != x.device)):
            raise RuntimeError(f"{op}: {name} is on {t.device} but input is on {x.device}; "
                               f"all tensors must be on one device")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"{op}: conv bias must have shape ({weight.shape[0]},), "
                         f"got {tuple(bias.shape)}")
    if norm in ("bn", "affine"):
        if norm_weight is None or norm_bias is None:
            raise ValueError(f"{op}: norm={norm!r} needs norm_weight and norm_bias")
    if norm != "none":
        for name, t in tensors[2:]:
            if t is not None and (t.dim() != 1 or t.shape[0] != channels):
                raise ValueError(f"{op}: {name} must have shape ({channels},) for the "
                                 f"{channels} channels the norm sees, got {tuple(t.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: give both running_mean and running_var, or neither")
    if norm in ("bn", "bn-minus") and training and x.shape[0] == 1:
        if norm_channels_of == "input":
            size = x.shape
        else:
            size = torch.Size((x.shape[0], channels) +
                              conv_output_hw(x, weight, stride, padding, dilation))
        if size[0] * size[2] * size[3] == 1:
            # The message nn.BatchNorm2d gives, so that users recognize it.
            raise ValueError(f"Expected more than 1 value per channel when training, "
                             f"got input size {size}")
    return channels
