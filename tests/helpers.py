"""Building blocks for comparing a fused unit with the float64 eager reference."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import fused
from fused import reference

FUNCTIONALS = {"conv-bn-relu": fused.conv_bn_relu, "conv-relu-bn": fused.conv_relu_bn,
               "bn-conv-relu": fused.bn_conv_relu}


@dataclass
class Case:
    order: str
    norm: str = "bn"
    training: bool = True
    channels_last: bool = False
    n: int = 4
    c_in: int = 3
    c_out: int = 5
    hw: tuple = (7, 7)
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    dilation: int = 1
    groups: int = 1
    bias: bool = True
    relu: bool = True
    momentum: float = 0.1
    eps: float = 1e-5
    dtype: torch.dtype = torch.float32
    input_mean: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def norm_channels(self) -> int:
        return self.c_in if self.order == "bn-conv-relu" else self.c_out


def make_tensors(case: Case, generator_seed: int = 0) -> dict:
    """Random inputs and parameters in float64; the caller casts."""
    g = torch.Generator().manual_seed(generator_seed)
    c = case.norm_channels
    t = dict(
        x=torch.randn(case.n, case.c_in, *case.hw, generator=g, dtype=torch.float64)
        + case.input_mean,
        weight=torch.randn(case.c_out, case.c_in // case.groups, case.kernel, case.kernel,
                           generator=g, dtype=torch.float64) * 0.3,
        bias=(torch.randn(case.c_out, generator=g, dtype=torch.float64) * 0.1
              if case.bias else None),
        running_mean=torch.randn(c, generator=g, dtype=torch.float64) * 0.2,
        running_var=torch.rand(c, generator=g, dtype=torch.float64) + 0.5,
        norm_weight=torch.rand(c, generator=g, dtype=torch.float64) + 0.5,
        norm_bias=torch.randn(c, generator=g, dtype=torch.float64) * 0.2,
    )
    if case.norm in ("bn", "bn-minus") and case.input_mean:
        # Running statistics consistent with far-from-zero data, as training would leave.
        t["running_mean"] += case.input_mean if case.order == "bn-conv-relu" else 0.0
    return t


def run_unit(fn, case: Case, tensors: dict, dtype: torch.dtype, grad_out: torch.Tensor | None,
             steps: int = 1):
    """Runs `steps` forward (+ backward) passes; returns output, grads and running stats."""
    def cast(v):
        return None if v is None else v.detach().clone().to(dtype)

    x = cast(tensors["x"])
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    params = {k: cast(tensors[k]) for k in ("weight", "bias", "norm_weight", "norm_bias")}
    # Per-channel parameters of the norm stay float32 for low-precision activations, as
    # under autocast; conv parameters follow the activations.
    for k in ("norm_weight", "norm_bias"):
        if dtype in (torch.float16, torch.bfloat16):
            params[k] = tensors[k].detach().clone().float()
    for v in params.values():
        if v is not None:
            v.requires_grad_(True)
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    running = {k: tensors[k].detach().clone().to(stat_dtype) for k in ("running_mean", "running_var")}
    if case.norm in ("affine", "none"):
        running = {"running_mean": None, "running_var": None}
    if case.norm in ("bn-minus", "none"):
        params["norm_weight"] = params["norm_bias"] = None
    if case.norm == "none":
        params["norm_weight"] = params["norm_bias"] = None
    out = None
    for _ in range(steps):
        out = fn(x, params["weight"], params["bias"], case.stride, case.padding, case.dilation,
                 case.groups, running["running_mean"], running["running_var"],
                 params["norm_weight"], params["norm_bias"], case.training, case.momentum,
                 case.eps, case.norm, case.relu)
    result = {"out": out, **running}
    if grad_out is not None:
        leaves = {"x": x, **{k: v for k, v in params.items() if v is not None}}
        grads = torch.autograd.grad(out, list(leaves.values()),
                                    grad_out.to(out.dtype), allow_unused=True)
        result.update({f"d{k}": v for k, v in zip(leaves, grads)})
    return result


def reference_fn(order: str):
    def fn(x, *args):
        return reference.unit_forward(order, x, *args)
    return fn


def assert_matches(actual: dict, expected: dict, rtol: float, atol: float, context: str,
                   grad_rtol: float | None = None, eager: dict | None = None):
    """Every key of `expected` (the float64 reference) matches `actual`.

    Element-wise |actual − expected| ≤ tol·|expected| + tol·max|expected| + 2·e, where e is
    the largest error of eager PyTorch at the same precision (`eager`, when given).

    The gradient of a conv bias that a batch norm follows is exactly 0 (Σ dy = 0) while its
    rounding noise is not; it is the same reduction over dy as the weight gradient, so its
    absolute tolerance is taken relative to the weight gradient's scale."""
    assert set(actual) == set(expected), (context, set(actual) ^ set(expected))
    for key, exp in expected.items():
        act = actual[key]
        if exp is None:
            assert act is None, f"{context}: {key} should be None"
            continue
        assert act is not None, f"{context}: {key} missing"
        tol = rtol if not key.startswith("d") or grad_rtol is None else grad_rtol
        exp = exp.double()
        slack = tol * exp.abs().max().item()
        if key == "dbias" and "dweight" in expected:
            slack = max(slack, tol * expected["dweight"].abs().max().item())
        if eager is not None:
            slack += 2 * (eager[key].double() - exp).abs().max().item()
        torch.testing.assert_close(act.double(), exp, rtol=tol, atol=slack,
                                   msg=lambda m: f"{context}: {key}: {m}")
