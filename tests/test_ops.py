"""The fused ops against the float64 eager reference (DESIGN §6).

Runs on whatever backend `fused.backend()` picks for CPU tensors (the C++ extension after
`make setup`); tests/triton/ repeats the checks for the Triton kernels."""
from __future__ import annotations

import dataclasses
import itertools
import importlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fused
from fused import reference
from tests.helpers import FUNCTIONALS, Case, assert_matches, make_tensors, reference_fn, run_unit

ORDERS = fused.ORDERS
NORMS = fused.NORMS


def compare(case: Case, steps: int = 1, rtol: float = 1e-5, grad_rtol: float = 1e-4):
    tensors = make_tensors(case)
    out_shape = run_unit(reference_fn(case.order), case, tensors, torch.float64, None)["out"].shape
    grad_out = torch.randn(out_shape, dtype=torch.float64)
    expected = run_unit(reference_fn(case.order), case, tensors, torch.float64, grad_out, steps)
    actual = run_unit(FUNCTIONALS[case.order], case, tensors, case.dtype, grad_out, steps)
    eager = (run_unit(reference_fn(case.order), case, tensors, case.dtype, grad_out, steps)
             if case.dtype != torch.float64 else None)
    assert_matches(actual, expected, rtol, rtol, repr(case), grad_rtol, eager)
    if case.channels_last and actual["out"].dim() == 4:
        assert actual["out"].is_contiguous(memory_format=torch.channels_last), \
            "channels_last input must give channels_last output, as eager conv does"
    return actual, expected


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("order", ORDERS)
def test_matrix_float32(order, norm, training, channels_last):
    compare(Case(order, norm, training, channels_last))


@pytest.mark.parametrize("order", ORDERS)
def test_float64_exact(order):
    # No conv bias: in front of a batch norm its gradient is exactly 0, and a relative
    # tolerance of 1e-10 cannot hold for a value that is rounding noise.
    compare(Case(order, "bn", True, dtype=torch.float64, bias=False), rtol=1e-10,
            grad_rtol=1e-10)


@pytest.mark.parametrize("order", ORDERS)
def test_running_stats_over_steps(order):
    actual, expected = compare(Case(order, "bn", True), steps=4)
    assert not torch.equal(actual["running_mean"], make_tensors(Case(order))["running_mean"].float())


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no-relu"])
@pytest.mark.parametrize("order", ORDERS)
def test_without_relu(order, relu):
    compare(Case(order, "bn", True, relu=relu))
    compare(Case(order, "bn", False, relu=relu))


SHAPES = {
    "one-channel": dict(c_in=1, c_out=1),
    "1x1-map": dict(n=2, hw=(1, 1), kernel=1, padding=0),
    "odd-hw": dict(hw=(5, 9)),
    "stride2": dict(hw=(8, 8), stride=2),
    "pointwise": dict(kernel=1, padding=0),
    "groups": dict(c_in=4, c_out=6, groups=2),
    "dilation": dict(hw=(9, 9), dilation=2, padding=2),
    "pad0": dict(padding=0),
    "pad2": dict(padding=2),
    "no-bias": dict(bias=False),
    "wide": dict(c_in=8, c_out=33, hw=(3, 3)),
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("order", ORDERS)
def test_odd_shapes(order, shape, channels_last):
    for training in (True, False):
        compare(Case(order, "bn", training, channels_last, **SHAPES[shape]))


@pytest.mark.parametrize("order", ORDERS)
def test_non_contiguous_input(order):
    case = Case(order, "bn", True)
    t = make_tensors(case)
    x = t["x"].float()
    wide = torch.zeros(x.shape[0], x.shape[1], x.shape[2], 2 * x.shape[3])
    wide[..., ::2] = x
    strided = wide[..., ::2]
    assert not strided.is_contiguous()
    args = (t["weight"].float(), t["bias"].float(), 1, 1, 1, 1, None, None,
            t["norm_weight"].float(), t["norm_bias"].float(), True)
    torch.testing.assert_close(FUNCTIONALS[order](strided, *args), FUNCTIONALS[order](x, *args))
    transposed = x.transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(FUNCTIONALS[order](transposed, *args), FUNCTIONALS[order](x, *args))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("norm", ["bn", "affine"])
@pytest.mark.parametrize("order", ORDERS)
def test_parameter_grads_without_input_grad(order, norm, training):
    """A network's first unit: the input needs no gradient (bn-conv-relu still computes dn,
    for its norm's sums, but no dx); parameter gradients as the reference."""
    torch.manual_seed(3)
    x = torch.randn(4, 3, 9, 7, dtype=torch.float64) * 2 + 0.5
    weight = torch.randn(5, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    channels = 3 if order == "bn-conv-relu" else 5
    gamma = (torch.rand(channels, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(channels, dtype=torch.float64, requires_grad=True)
    running = (torch.randn(channels, dtype=torch.float64), torch.rand(channels, dtype=torch.float64) + 0.5)
    grads = []
    for fn in (FUNCTIONALS[order], reference_fn(order)):
        out = fn(x, weight, None, 2, 1, 1, 1, *(r.clone() for r in running), gamma, beta,
                 training, 0.1, 1e-5, norm, True)
        grads.append(torch.autograd.grad(out, (weight, gamma, beta), torch.ones_like(out)))
    for name, a, b in zip(("weight", "gamma", "beta"), *grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"d{name}: {m}")


def check_mean_1e4(order: str, norm: str, seed: int):
    """Variance must be stable: a naive E[t²] − E[t]² in float32 loses every digit here. At
    mean 1e4 (std 1) bn-conv-relu does not fold (x·s and b would cancel inside the
    convolution's sum) and applies the norm explicitly, with the exact shift from the float64
    mean (csrc/norm.cpp, kExactShiftAbove): where eager's t·s + (beta − mean·s) leaves a
    per-channel offset of ~5e-4 on every value, fused is 30-1000x more exact. Every output and gradient, the conv weight's included, stays
    within twice eager's error."""
    torch.manual_seed(seed)
    case = Case(order, norm, True, input_mean=1e4, bias=True, hw=(6, 6))
    tensors = make_tensors(case, seed)
    if order != "bn-conv-relu":
        tensors["bias"] += 1e4  # push the conv output, which the norm sees, to mean 1e4
    # The float64 reference takes the float32 inputs both implementations see. From the
    # unrounded ones, the inputs' own rounding (half an ulp of 1e4, 4.9e-4 on every value)
    # would be most of both errors and would decide by chance which ReLU outputs near 0
    # each implementation gets on the wrong side.
    tensors = {k: None if v is None else v.float().double() for k, v in tensors.items()}
    grad_out = torch.randn_like(run_unit(reference_fn(order), case, tensors, torch.float64,
                                         None)["out"])
    exp = run_unit(reference_fn(order), case, tensors, torch.float64, grad_out)
    eager = run_unit(reference_fn(order), case, tensors, torch.float32, grad_out)
    got = run_unit(FUNCTIONALS[order], case, tensors, torch.float32, grad_out)
    for key in ("out", "running_mean", "running_var", "dnorm_weight", "dnorm_bias", "dx",
                "dweight", "dbias"):
        if exp.get(key) is None:
            continue
        eager_err = (eager[key].double() - exp[key]).abs().max().item()
        err = (got[key].double() - exp[key]).abs().max().item()
        # A conv bias that a batch norm follows has gradient Σdy = 0 exactly, while its
        # rounding noise is that of the weight gradient's reduction over dy (helpers).
        scale = exp["dweight" if key == "dbias" else key].abs().max().item()
        assert err <= 2 * eager_err + 1e-6 * scale, (key, err, eager_err, scale)


@pytest.mark.parametrize("norm", ["bn", "bn-minus"])
@pytest.mark.parametrize("order", ORDERS)
def test_mean_1e4_data_is_as_exact_as_eager(order, norm):
    @settings(max_examples=6, deadline=None, derandomize=True, database=None)
    @given(seed=st.integers(0, 2**31 - 1))
    def run(seed):
        check_mean_1e4(order, norm, seed)
    run()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("order", ORDERS)
def test_low_precision_error_within_twice_eager(order, dtype):
    """flash-attention's rule: fused error vs float64 ≤ 2 × eager's own error + atol."""
    case = Case(order, "bn", True, dtype=dtype, c_in=4, c_out=8, hw=(8, 8))
    tensors = make_tensors(case)
    grad_out = torch.randn_like(run_unit(reference_fn(order), case, tensors, torch.float64,
                                         None)["out"])
    exp = run_unit(reference_fn(order), case, tensors, torch.float64, grad_out)
    eager = run_unit(reference_fn(order), case, tensors, dtype, grad_out)
    got = run_unit(FUNCTIONALS[order], case, tensors, dtype, grad_out)
    assert got["out"].dtype == dtype
    for key, value in exp.items():
        if value is None:
            continue
        eager_err = (eager[key].double() - value).abs().max().item()
        err = (got[key].double() - value).abs().max().item()
        atol = 1e-3 * value.abs().max().item()
        assert err <= 2 * eager_err + atol, (key, err, eager_err)
    assert got["running_mean"].dtype == torch.float32
    assert got["dnorm_weight"].dtype == torch.float32


# --------------------------------------------------------------------------------------
# Modules: state_dict interchange, momentum=None, track_running_stats=False
# --------------------------------------------------------------------------------------

MODULES = {"conv-bn-relu": fused.ConvBNReLU2d, "conv-relu-bn": fused.ConvReLUBN2d,
           "bn-conv-relu": fused.BNConvReLU2d}


def assert_grads_close(actual, expected, rtol=1e-4):
    """Parameter gradients, atol relative to the largest gradient of the model: some are
    exactly 0 in real arithmetic (a shift that a later batch norm removes, a conv bias in
    front of a batch norm) and float32 leaves only rounding noise there."""
    scale = max(g.abs().max().item() for g in expected)
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)


def _module_pair(order, **kwargs):
    eager = fused.Unit(order, 3, 6, 3, padding=1, **kwargs)
    fast = MODULES[order](3, 6, 3, padding=1, **kwargs)
    fast.load_state_dict(eager.state_dict(), strict=True)
    return eager, fast


@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "cumulative"])
@pytest.mark.parametrize("order", ORDERS)
def test_module_training_steps_match_eager(order, momentum):
    eager, fast = _module_pair(order, bias=True, momentum=momentum)
    assert list(eager.state_dict()) == list(fast.state_dict())
    for step in range(3):
        x = torch.randn(4, 3, 6, 6)
        ye, yf = eager(x), fast(x)
        torch.testing.assert_close(yf, ye, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(ye)
        ge = torch.autograd.grad(ye, list(eager.parameters()), g)
        gf = torch.autograd.grad(yf, list(fast.parameters()), g)
        assert_grads_close(gf, ge)
    for (name, a), b in zip(fast.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert int(fast.norm.num_batches_tracked) == 3
    eager.eval(), fast.eval()
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(fast(x), eager(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("order", ORDERS)
def test_module_without_running_stats(order, training):
    eager, fast = _module_pair(order, track_running_stats=False)
    assert fast.norm.running_mean is None
    eager.train(training), fast.train(training)
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(fast(x), eager(x), rtol=1e-5, atol=1e-5)


def test_module_state_dict_names_are_plain_pytorch():
    unit = fused.ConvBNReLU2d(3, 8, 3, norm="bn")
    assert set(unit.state_dict()) == {"conv.weight", "norm.weight", "norm.bias",
                                      "norm.running_mean", "norm.running_var",
                                      "norm.num_batches_tracked"}
    assert set(fused.ConvReLUBN2d(3, 8, 3, norm="affine").state_dict()) == {
        "conv.weight", "norm.weight", "norm.bias"}
    assert set(fused.BNConvReLU2d(3, 8, 3, norm="bn").state_dict())
    assert fused.BNConvReLU2d(3, 8, 3).norm.num_features == 3
    assert fused.ConvBNReLU2d(3, 8, 3, norm="none").norm is None
    plain = torch.nn.Sequential()
    plain.add_module("conv", torch.nn.Conv2d(3, 8, 3, bias=False))
    plain.add_module("norm", torch.nn.BatchNorm2d(8))
    unit.load_state_dict(plain.state_dict(), strict=True)


# --------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile, hypothesis
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("order", ORDERS)
def test_gradcheck_float64(order, training):
    case = Case(order, "bn", training, n=2, c_in=2, c_out=3, hw=(4, 4))
    t = make_tensors(case)
    inputs = [t[k].clone().requires_grad_() for k in ("x", "weight", "bias", "norm_weight",
                                                      "norm_bias")]

    def fn(x, w, b, gamma, beta):
        return FUNCTIONALS[order](x, w, b, 1, 1, 1, 1, t["running_mean"].clone(),
                                  t["running_var"].clone(), gamma, beta, training)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def _op_samples():
    case = Case("conv-bn-relu", "bn", True, n=2, c_in=3, c_out=4, hw=(5, 5))
    t = make_tensors(case)
    f = {k: (v.float() if v is not None else None) for k, v in t.items()}
    geo = ([1, 1], [1, 1], [1, 1], 1)
    for relu_mode in (1, 2):
        for stats in ((None, None), (f["running_mean"][:4], f["running_var"][:4])):
            yield (torch.ops.bnorder.conv_norm_forward,
                   (f["x"].requires_grad_(), f["weight"].requires_grad_(), f["bias"], *geo,
                    f["norm_weight"][:4].clone().requires_grad_(),
                    f["norm_bias"][:4].clone().requires_grad_(), *stats, 1e-5, "bn",
                    relu_mode, stats[0] is not None and relu_mode == 1))
    for stats in ((None, None), (f["running_mean"][:3], f["running_var"][:3])):
        yield (torch.ops.bnorder.norm_conv_forward,
               (f["x"].requires_grad_(), f["weight"].requires_grad_(), None, *geo,
                f["norm_weight"][:3].clone().requires_grad_(),
                f["norm_bias"][:3].clone().requires_grad_(), *stats, 1e-5, "bn", True))


@pytest.mark.parametrize("sample", range(6))
def test_opcheck_unit_ops(sample):
    op, args = list(_op_samples())[sample]
    torch.library.opcheck(op, args)


@pytest.mark.skipif(fused.backend() != "cpp", reason="C++ extension not loaded")
@pytest.mark.parametrize("geometry", [
    # (C_in, C_out, groups, H, W, kH, kW, stride, padding, dilation)
    (3, 4, 1, 7, 9, 3, 3, (1, 1), (1, 1), (1, 1)),
    (4, 6, 2, 8, 5, 3, 2, (2, 1), (2, 0), (1, 2)),
    (6, 6, 3, 5, 5, 5, 5, (1, 2), (3, 1), (1, 1)),
    (2, 3, 1, 1, 1, 3, 3, (1, 1), (1, 1), (1, 1)),
    (5, 2, 1, 6, 6, 1, 1, (2, 2), (0, 0), (1, 1)),
], ids=["3x3", "groups-stride-dilation", "5x5-wide-pad", "1px", "1x1-stride2"])
def test_border_map_and_its_weight_gradient_equal_the_convolutions(geometry):
    """bn-conv-relu's border map and its weight gradient, computed separably, against the
    convolution of the image holding b_c inside its borders (float64)."""
    from fused import _conv
    cin, cout, groups, h, w, kh, kw, stride, padding, dilation = geometry
    shift = torch.randn(cin, dtype=torch.float64)
    weight = torch.randn(cout, cin // groups, kh, kw, dtype=torch.float64, requires_grad=True)
    image = shift.view(1, -1, 1, 1).expand(1, cin, h, w)
    expected = torch.nn.functional.conv2d(image, weight, None, stride, padding, dilation, groups)
    actual = _conv.border_map(shift, weight, (h, w), expected.shape[2:], stride, padding,
                              dilation, groups)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    grad_sum = torch.randn_like(expected)
    (expected_wgrad,) = torch.autograd.grad(expected, weight, grad_sum)
    taps = _conv.border_taps(grad_sum, weight, (h, w), stride, padding, dilation,
                             torch.float64)
    actual_wgrad = _conv.border_map_weight_grad(shift, taps, weight, groups)
    torch.testing.assert_close(actual_wgrad, expected_wgrad, rtol=1e-12, atol=1e-12)

    x = torch.randn(3, cin, h, w, dtype=torch.float64)
    g = torch.randn(3, *expected.shape[1:], dtype=torch.float64)
    (wgrad,) = torch.autograd.grad(torch.nn.functional.conv2d(x, weight, None, stride, padding,
                                                              dilation, groups), weight, g)

    # The C++ backend's fold_forward / fold_backward (csrc/fold.cpp) against the same steps
    # composed from the torch helpers above, for weights, weight gradients and batch sums in
    # either layout (the C++ code reads channels_last weights as they are and returns its
    # weights and map in the weight's layout).
    if fused.backend() == "cpp":
        from fused import _cpp
        scale = torch.rand(cin, dtype=torch.float64) + 0.5
        grad_sum = g.sum(0, keepdim=True)
        expected = (*_conv.fold_forward(weight, scale, shift, (h, w), expected.shape[2:], stride,
                                        padding, dilation, groups),
                    _conv.fold_backward(weight.detach(), wgrad, grad_sum, scale, shift, (h, w),
                                        stride, padding, dilation, groups))
        cl = torch.channels_last
        for w_fmt, g_fmt, sum_fmt in [(torch.contiguous_format,) * 3, (cl, cl, cl),
                                      (cl, torch.contiguous_format, torch.contiguous_format),
                                      (torch.contiguous_format, cl, cl)]:
            w_in = weight.detach().contiguous(memory_format=w_fmt)
            actual = (*_cpp.fold_forward(w_in, scale, shift, (h, w), expected[1].shape[2:],
                                         stride, padding, dilation, groups),
                      _cpp.fold_backward(w_in, wgrad.contiguous(memory_format=g_fmt),
                                         grad_sum.contiguous(memory_format=sum_fmt), scale,
                                         shift, (h, w), stride, padding, dilation, groups))
            for name, a, b in zip(("scaled weight", "border map", "dweight"), actual, expected):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12,
                                           msg=lambda m: f"{name} ({w_fmt}, {g_fmt}): {m}")
            # (A 1x1 channels_last weight is also contiguous, and counts as such.)
            layout = torch.contiguous_format if w_in.is_contiguous() else w_fmt
            for name, t in zip(("scaled weight", "border map", "dweight"), actual[:3]):
                assert t.is_contiguous(memory_format=layout), (
                    f"{name} is not in the weight's layout {layout}: strides {t.stride()}")


@pytest.mark.skipif(fused.backend() != "cpp", reason="C++ extension not loaded")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("norm", ["bn", "bn-minus", "affine"])
def test_cpp_norm_composites_match_torch_composition(norm, dtype, channels_last):
    """csrc/norm.cpp (one call per direction) against _norm.forward/backward composed from
    the same C++ primitives with torch ops in between: the two must agree to rounding."""
    from fused import _cpp, _norm
    from types import SimpleNamespace
    composed = SimpleNamespace(stats=_cpp.stats, apply=_cpp.apply,
                               backward_reduce=_cpp.backward_reduce,
                               backward_apply=_cpp.backward_apply)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    t = (torch.randn(4, 5, 6, 7) * 3 + 1).to(dtype).contiguous(memory_format=fmt)
    g = torch.randn_like(t)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gamma, beta = torch.rand(5, dtype=acc) + 0.5, torch.randn(5, dtype=acc)
    running = (torch.randn(5, dtype=acc), torch.rand(5, dtype=acc) + 0.5)
    params = (None, None) if norm == "bn-minus" else (gamma, beta)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    for relu_mode in (0, 1, 2):
        for stats_in in ((None, None), running):
            batch_stats = norm != "affine" and stats_in[0] is None
            results = []
            for prims in (_cpp, composed):
                out, mean, var, scale, shift = _norm.forward(prims, t, *params, *stats_in, 1e-5,
                                                             norm, relu_mode, True)
                used = (mean, var) if batch_stats else stats_in
                dt, dgamma, dbeta = _norm.backward(prims, g, t, *used, *params, 1e-5, norm,
                                                   relu_mode, batch_stats, True)
                results.append((out, mean, var, scale, shift, dt, dgamma, dbeta))
            for name, a, b in zip("out mean var scale shift dt dgamma dbeta".split(), *results):
                torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")
            assert results[0][0].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("norm", ["bn", "bn-minus"])
def test_norm_coefficients_are_rounded_once(backend, norm):
    """scale and shift multiply or offset a whole channel, so their rounding is one error
    shared by every value of it, which the next layer sums in phase: each is the float64
    value rounded once to float32 (C++ and torch compositions alike), as are backward's
    per-channel factors dgamma, k2 and k3."""
    from fused import _norm
    if backend == "cpp" and fused.backend() != "cpp":
        pytest.skip("C++ extension not loaded")
    prims = fused._cpp if backend == "cpp" else None
    gen = torch.Generator().manual_seed(0)
    C, eps = 4096, 1e-5
    f32 = dict(generator=gen, dtype=torch.float32)
    mean = torch.randn(C, **f32) * 3
    var = torch.rand(C, **f32) * 4 + 1e-3
    gamma, beta = torch.rand(C, **f32) + 0.5, torch.randn(C, **f32)
    params = (gamma, beta) if norm == "bn" else (None, None)
    like = torch.empty(1, C, 1, 1, dtype=torch.float32)
    def coefficients():
        return _norm.coefficients(norm, mean, var, *params, eps, C, like, prims)

    scale, shift, mean_c, rstd = coefficients()
    # The float64 values correctly rounded: numpy's sqrt is the IEEE operation. torch.sqrt on
    # float64 CPU tensors is not: ATen hands it to MKL's vector math, which is usually within
    # an ulp (23 of these 4096 roots differ from the correctly rounded ones), but in an
    # occasional test process a reference taken from it was 1.6e5 and 2.7e4 ulps off on
    # channels 3909 and 4047 of this draw, which then rounded to the other float32; the C++
    # scale was the correctly rounded one.
    v64 = (var.double() + eps).numpy()
    r64 = torch.from_numpy(1 / np.sqrt(v64))
    s64 = r64 * gamma.double() if norm == "bn" else r64
    # Centered: the shift is beta (0 for bn-minus), the mean comes back with its digits.
    b = beta if norm == "bn" else torch.zeros(C)
    again = coefficients()
    assert all(torch.equal(x, y) for x, y in zip(again, (scale, shift, mean_c, rstd))), \
        "the same inputs gave different coefficients"
    differ = (scale != s64.float()).nonzero().flatten()
    assert len(differ) == 0, (
        f"{len(differ)} channels differ; the first: {differ[:5].tolist()}, scale "
        f"{scale[differ[:5]].tolist()}, float64 {s64[differ[:5]].tolist()}, var "
        f"{var[differ[:5]].tolist()}, gamma {gamma[differ[:5]].tolist()}")
    assert torch.equal(shift, b)
    assert torch.equal(rstd, r64.float())
    assert mean_c.dtype == torch.float64 and torch.equal(mean_c, mean.double())
    sum_g, sum_gtc = torch.randn(C, **f32), torch.randn(C, **f32)
    k1, k2, k3, dgamma, dbeta = _norm.backward_coefficients(sum_g, sum_gtc, scale, rstd, 64,
                                                            True)
    d64 = sum_gtc.double() * rstd.double()
    assert torch.equal(dgamma, d64.float()) and torch.equal(dbeta, sum_g)
    assert torch.equal(k2, (scale.double() * rstd.double() * d64 / -64).float())
    assert torch.equal(k3, (scale.double() * sum_g.double() / -64).float())


def test_opcheck_cpp_primitives():
    t = torch.randn(3, 4, 5, 5)
    g = torch.randn_like(t)
    v = [torch.rand(4) + 0.5 for _ in range(6)]
    ops = torch.ops.bnorder_cpu
    for mode in (0, 1, 2):
        torch.library.opcheck(ops.stats, (t, mode))
        torch.library.opcheck(ops.apply, (t, v[3].double(), v[0], v[1], mode))
        torch.library.opcheck(ops.backward_reduce, (g, t, v[0], v[1], v[2], mode))
        torch.library.opcheck(ops.backward_apply, (g, t, *v, mode))
    for fmt in (torch.contiguous_format, torch.channels_last):
        z, out = (torch.randn(3, 4, 5, 5).contiguous(memory_format=fmt) for _ in range(2))
        torch.library.opcheck(ops.add_map_relu, (z, torch.randn(1, 4, 5, 5), True))
        torch.library.opcheck(ops.relu_grad_batch_sum, (z, out))
    gamma, beta = torch.rand(4) + 0.5, torch.randn(4)
    mean, var = ops.stats(t, 0)
    for norm, params in ((0, (gamma, beta)), (1, (None, None)), (2, (gamma, beta))):
        torch.library.opcheck(ops.coefficients, (mean, var, *params, 1e-5, norm, 4,
                                                 torch.float32))
        for stats_in in ((None, None), (mean, var)):
            torch.library.opcheck(ops.norm_forward, (t, *params, *stats_in, 1e-5, norm, 1, True))
        torch.library.opcheck(ops.norm_backward, (g, t, mean, var, *params, 1e-5, norm, 2, True,
                                                  True))
    weight = torch.randn(6, 2, 3, 3)
    scale, shift, mean_c = torch.rand(4) + 0.5, torch.randn(4), torch.randn(4)
    torch.library.opcheck(ops.fold_forward, (weight, scale, shift, [5, 5], [3, 3], [2, 2],
                                             [1, 1], [1, 1], 2))
    torch.library.opcheck(ops.fold_backward, (weight, torch.randn(6, 2, 3, 3),
                                              torch.randn(1, 6, 3, 3), scale, shift,
                                              [5, 5], [2, 2], [1, 1], [1, 1], 2))
    torch.library.opcheck(ops.update_running_stats, (torch.zeros(4), torch.ones(4), mean, var,
                                                     t.numel() // 4, 0.1))


@pytest.mark.skipif(fused.backend() != "cpp", reason="C++ extension not loaded")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cpp_border_passes_match_reference(channels_last, dtype):
    """bn-conv-relu's two extra C++ passes against their torch definitions."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    z = torch.randn(5, 6, 7, 9, dtype=dtype).contiguous(memory_format=fmt)
    g = torch.randn_like(z)
    image = torch.randn(1, 6, 7, 9, dtype=dtype)
    ops = torch.ops.bnorder_cpu
    for relu in (True, False):
        torch.testing.assert_close(ops.add_map_relu(z, image, relu),
                                   reference.add_map_relu(z, image, relu))
    out = ops.add_map_relu(z, image, True)
    gz, total = ops.relu_grad_batch_sum(g, out)
    ref_gz, ref_total = reference.relu_grad_batch_sum(g, out)
    torch.testing.assert_close(gz, ref_gz)
    torch.testing.assert_close(total, ref_total, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-2 if dtype == torch.bfloat16 else 1e-5)
    assert gz.is_contiguous(memory_format=fmt) and total.shape == (1, 6, 7, 9)
    with pytest.raises(RuntimeError, match="map must have size"):
        ops.add_map_relu(z, torch.randn(1, 6, 7, 8, dtype=dtype), True)


def test_compile_fullgraph_stack_matches_eager():
    torch.manual_seed(0)
    units = [("conv-bn-relu", 3, 8), ("conv-relu-bn", 8, 8), ("bn-conv-relu", 8, 4)]
    eager = torch.nn.Sequential(*[fused.Unit(o, i, c, 3, padding=1) for o, i, c in units])
    fast = torch.nn.Sequential(*[MODULES[o](i, c, 3, padding=1) for o, i, c in units])
    fast.load_state_dict(eager.state_dict())
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 8, 8)
    ye, yc = eager(x), compiled(x)
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ye)
    assert_grads_close(torch.autograd.grad(yc, list(fast.parameters()), g),
                       torch.autograd.grad(ye, list(eager.parameters()), g))
    for a, b in zip(fast.state_dict().values(), eager.state_dict().values()):
        torch.testing.assert_close(a, b)


@settings(max_examples=25, deadline=None)
@given(order=st.sampled_from(ORDERS), norm=st.sampled_from(NORMS), training=st.booleans(),
       channels_last=st.booleans(), n=st.integers(1, 3), c_in=st.integers(1, 5),
       c_out=st.integers(1, 6), h=st.integers(1, 7), w=st.integers(1, 7),
       kernel=st.sampled_from([1, 3]), stride=st.integers(1, 2), bias=st.booleans(),
       relu=st.booleans(), seed=st.integers(0, 2**16))
def test_property_random_shapes(order, norm, training, channels_last, n, c_in, c_out, h, w,
                                kernel, stride, bias, relu, seed):
    padding = kernel // 2
    case = Case(order, norm, training, channels_last, n=n, c_in=c_in, c_out=c_out, hw=(h, w),
                kernel=kernel, stride=stride, padding=padding, bias=bias, relu=relu)
    ho = (h + 2 * padding - kernel) // stride + 1
    wo = (w + 2 * padding - kernel) // stride + 1
    per_channel = n * (h * w if order == "bn-conv-relu" else ho * wo)
    if training and norm in ("bn", "bn-minus") and per_channel == 1:
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            compare(case)
        return
    tensors = make_tensors(case, seed)
    out_shape = run_unit(reference_fn(order), case, tensors, torch.float64, None)["out"].shape
    grad_out = torch.randn(out_shape, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(seed))
    exp = run_unit(reference_fn(order), case, tensors, torch.float64, grad_out)
    got = run_unit(FUNCTIONALS[order], case, tensors, torch.float32, grad_out)
    # Tiny batches (M = 2) make the normalization ill-conditioned, and some gradients are
    # then exactly 0 with only rounding noise left (with M = 2 the normalized values are ±1
    # whatever the input). The float32 error is bounded by eager float32's own error plus
    # 1e-4 of the largest value of the same kind (outputs, or any gradient).
    eager = run_unit(reference_fn(order), case, tensors, torch.float32, grad_out)
    grad_scale = max([v.abs().max().item() for k, v in exp.items()
                      if k.startswith("d") and v is not None] + [1e-30])
    # With M = 2 values per channel the normalized values are ±1 whatever the norm's input,
    # so the gradients that flow back through the normalization (to x, and for the
    # conv-first orders to the conv too) are exactly 0: only rounding noise, not compared.
    noise_only = set()
    if training and norm in ("bn", "bn-minus") and per_channel == 2:
        noise_only = {"dx"} if order == "bn-conv-relu" else {"dx", "dweight", "dbias"}
    for key, value in exp.items():
        if value is None:
            assert got[key] is None
            continue
        if key in noise_only:
            continue
        err = (got[key].double() - value).abs().max().item()
        eager_err = (eager[key].double() - value).abs().max().item()
        scale = grad_scale if key.startswith("d") else max(value.abs().max().item(), 1e-30)
        assert err <= 2 * eager_err + 1e-4 * scale, (key, err, eager_err, scale)


# --------------------------------------------------------------------------------------
# Bad input and NaN
# --------------------------------------------------------------------------------------

def _args(**over):
    base = dict(input=torch.randn(2, 3, 5, 5), weight=torch.randn(4, 3, 3, 3),
                running_mean=torch.zeros(4), running_var=torch.ones(4),
                norm_weight=torch.ones(4), norm_bias=torch.zeros(4), training=True)
    base.update(over)
    return base


@pytest.mark.parametrize("bad, match", [
    (dict(input=torch.randn(3, 5, 5)), "4-D input"),
    (dict(input=torch.randn(2, 2, 5, 5)), "channels"),
    (dict(input=torch.randint(0, 5, (2, 3, 5, 5))), "floating-point"),
    (dict(input=torch.randn(1, 3, 3, 3)), "more than 1 value per channel"),
    (dict(running_mean=torch.zeros(5)), "running_mean must have shape"),
    (dict(norm_weight=None), "needs norm_weight"),
    (dict(weight=torch.randn(4, 3, 3, 3, dtype=torch.float64)), "dtype"),
    (dict(running_var=None), "both running_mean and running_var"),
])
@pytest.mark.parametrize("order", ["conv-bn-relu", "conv-relu-bn"])
def test_bad_input_raises_clear_error(order, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        FUNCTIONALS[order](**_args(**bad))


def test_bad_input_bn_conv_relu():
    with pytest.raises(ValueError, match="running_mean must have shape"):
        fused.bn_conv_relu(**_args())  # the norm of bn-conv-relu sees the 3 input channels
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused.bn_conv_relu(torch.randn(1, 3, 1, 1), torch.randn(4, 3, 1, 1), training=True,
                           norm="bn-minus")
    with pytest.raises(ValueError, match="unknown norm"):
        fused.bn_conv_relu(torch.randn(2, 3, 4, 4), torch.randn(4, 3, 1, 1), norm="layer")


def test_device_mix_raises():
    meta = torch.zeros(4, device="meta")
    with pytest.raises(RuntimeError, match="one device"):
        fused.conv_bn_relu(**_args(running_mean=meta))


@pytest.mark.skipif(fused.backend() != "cpp", reason="C++ extension not loaded")
def test_cpp_primitives_reject_bad_input():
    ops = torch.ops.bnorder_cpu
    t = torch.randn(2, 4, 3, 3)
    zeros = torch.zeros(4)
    with pytest.raises(RuntimeError, match="scale must have shape"):
        ops.apply(t, zeros, torch.ones(3), zeros, 0)
    with pytest.raises(RuntimeError, match="mean must have shape"):
        ops.apply(t, torch.zeros(3), torch.ones(4), zeros, 0)
    with pytest.raises(RuntimeError, match="relu_mode"):
        ops.apply(t, zeros, torch.ones(4), zeros, 7)
    with pytest.raises(RuntimeError, match="must be Float"):
        ops.apply(t, zeros, torch.ones(4, dtype=torch.float64), zeros, 0)
    with pytest.raises(RuntimeError, match="mean must be float64 or float32"):
        ops.apply(t, torch.zeros(4, dtype=torch.float16), torch.ones(4), zeros, 0)
    with pytest.raises(RuntimeError, match="contiguous or channels_last"):
        ops.stats(t.transpose(0, 2), 0)
    with pytest.raises(RuntimeError, match="floating-point"):
        ops.stats(torch.ones(2, 4, dtype=torch.int32), 0)
    with pytest.raises(RuntimeError, match="memory format"):
        ops.backward_reduce(torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last),
                            t, torch.zeros(4), torch.ones(4), torch.zeros(4), 0)
    with pytest.raises(RuntimeError, match="does not match input size"):
        ops.backward_apply(torch.randn(2, 4, 3, 2), t, *[torch.ones(4)] * 6, 0)
    # the norm composites, the fold and the running-statistics update
    with pytest.raises(RuntimeError, match="gamma must have shape"):
        ops.norm_forward(t, torch.ones(3), torch.zeros(4), None, None, 1e-5, 0, 1, True)
    with pytest.raises(RuntimeError, match="gamma is required"):
        ops.norm_forward(t, None, None, None, None, 1e-5, 0, 1, True)
    with pytest.raises(RuntimeError, match="norm must be 0"):
        ops.norm_forward(t, torch.ones(4), torch.zeros(4), None, None, 1e-5, 5, 1, True)
    with pytest.raises(RuntimeError, match="mean must have shape"):
        ops.norm_backward(t, t, torch.zeros(5), torch.ones(4), None, None, 1e-5, 1, 0, True,
                          True)
    with pytest.raises(RuntimeError, match="scale and shift must be"):
        ops.fold_forward(torch.randn(6, 4, 3, 3), torch.ones(5), torch.zeros(4), [5, 5], [5, 5],
                         [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="float32/float64 weights"):
        ops.fold_forward(torch.randn(6, 4, 3, 3).half(), torch.ones(4).half(),
                         torch.zeros(4).half(), [5, 5], [5, 5], [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="grad_sum must be"):
        ops.fold_backward(torch.randn(6, 4, 3, 3), torch.randn(6, 4, 3, 3), torch.randn(1, 5, 5, 5),
                          torch.ones(4), torch.zeros(4), [5, 5], [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="more than one value"):
        ops.update_running_stats(torch.zeros(4), torch.ones(4), torch.zeros(4), torch.ones(4),
                                 1, 0.1)
    with pytest.raises(RuntimeError, match="contiguous CPU vectors of 4"):
        ops.update_running_stats(torch.zeros(4), torch.ones(3), torch.zeros(4), torch.ones(4),
                                 8, 0.1)


@pytest.mark.parametrize("order", ORDERS)
def test_nan_propagates_like_eager(order):
    case = Case(order, "bn", False)
    tensors = make_tensors(case)
    tensors["x"][0, 0, 2, 2] = math.nan
    expected = run_unit(reference_fn(order), case, tensors, torch.float32, None)["out"]
    got = run_unit(FUNCTIONALS[order], case, tensors, torch.float32, None)["out"]
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    assert torch.isnan(got).any()
    training = dataclasses.replace(case, training=True)
    expected = run_unit(reference_fn(order), training, tensors, torch.float32, None)
    got = run_unit(FUNCTIONALS[order], training, tensors, torch.float32, None)
    assert torch.equal(torch.isnan(got["out"]), torch.isnan(expected["out"]))
    assert torch.equal(torch.isnan(got["running_mean"]), torch.isnan(expected["running_mean"]))


def test_backend_selection(monkeypatch):
    monkeypatch.setenv("FUSED_BACKEND", "reference")
    assert fused.backend() == "reference"
    case = Case("conv-bn-relu")
    compare(case)
    monkeypatch.setenv("FUSED_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FUSED_BACKEND"):
        fused.backend()
    monkeypatch.setenv("FUSED_BACKEND", "auto")
    assert fused.backend() in ("cpp", "reference")
    assert fused.backend() == ("cpp" if fused.extension_error() is None else "reference")


def test_reference_primitives_agree_with_unit_reference():
    """The reference primitives implement the same norm as F.batch_norm."""
    t = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    mean, var = reference.stats(t, reference.RELU_NONE)
    torch.testing.assert_close(mean, t.mean((0, 2, 3)))
    torch.testing.assert_close(var, t.var((0, 2, 3), unbiased=False))


@pytest.mark.parametrize("order", ORDERS)
def test_meta_tensors_propagate_shapes(order):
    """Shape propagation on the meta device (as models' MAC counting does) uses the ops'
    fake implementations, forward and backward."""
    unit = MODULES[order](3, 8, 3, stride=2, padding=1).to("meta").to(
        memory_format=torch.channels_last)
    x = torch.empty(4, 3, 9, 9, device="meta").contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    out = unit(x)
    assert out.shape == (4, 8, 5, 5) and out.is_meta
    (dx,) = torch.autograd.grad(out, [x], torch.empty_like(out))
    assert dx.shape == x.shape


@pytest.mark.skipif(fused.backend() != "cpp", reason="C++ extension not loaded")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cpp_reductions_every_chunk_width(channels_last, dtype):
    """stats and backward_reduce read rows in chunks of 4, 2 and 1 vectors of channels plus a
    runtime-width rest, and planes in vectors plus a scalar tail, two threads splitting them
    mid-sample: shapes that reach each piece, against float64, at mean 0 and mean 1e4."""
    ops = torch.ops.bnorder_cpu
    shapes = [(64, 3, 5, 3), (9, 16, 8, 8), (64, 19, 8, 8), (5, 48, 2, 2), (33, 64, 7, 7),
              (4, 112, 6, 6), (3, 133, 4, 4), (2, 5, 33, 33), (300, 24, 1, 1)]
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for shape, offset, mode in itertools.product(shapes, (0.0, 1e4), (0, 1, 2)):
        c = shape[1]
        t = (torch.randn(shape, dtype=torch.float64) + offset).to(dtype)
        m, s = torch.randn(c, dtype=dtype) + offset, torch.rand(c, dtype=dtype) + 0.5
        b = torch.randn(c, dtype=dtype)
        pre = ((t.double() - m.double().view(1, c, 1, 1)) * s.double().view(1, c, 1, 1)
               + b.double().view(1, c, 1, 1))
        # No gradient where rounding may decide the ReLU mask ((t − m)·s + b within 1e-3 of 0).
        g = torch.randn_like(t) * (pre.abs() > 1e-3)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        mean, var = ops.stats(t.contiguous(memory_format=fmt), mode)
        sum_g, sum_gt = ops.backward_reduce(g.contiguous(memory_format=fmt),
                                            t.contiguous(memory_format=fmt), m, s, b, mode)
        t64, g64 = t.double(), g.double()
        seen = t64.relu() if mode == 2 else t64
        exp_var, exp_mean = torch.var_mean(seen, dim=(0, 2, 3), unbiased=False)
        std = exp_var.sqrt()
        case = (shape, offset, mode)
        assert ((mean.double() - exp_mean).abs() <= tol * (exp_mean.abs() + std)).all(), case
        # At mean 1e4 a naive E[t²] − E[t]² in float32 is off by 100 %; the shifted sums stay
        # within 3e-6 (the earlier two-pass kernels, whose float block means drift, 1.3e-4).
        assert ((var.double() - exp_var).abs() <= tol * exp_var).all(), case
        bc = lambda v: v.double().view(1, c, 1, 1)  # noqa: E731
        if mode == 1:
            g64 = g64 * ((t64 - bc(m)) * bc(s) + bc(b) > 0)
        exp_g = g64.sum((0, 2, 3))
        exp_gt = (g64 * (seen - bc(m))).sum((0, 2, 3))
        scale = (g64.abs().sum((0, 2, 3)) * (1 + (seen - bc(m)).abs().amax((0, 2, 3)))) + 1
        assert ((sum_g.double() - exp_g).abs() <= tol * scale).all(), case
        assert ((sum_gt.double() - exp_gt).abs() <= tol * scale).all(), case


@pytest.mark.skipif(fused.backend() != "cpp", reason="C++ extension not loaded")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_cpp_fold_exact_matches_the_torch_test(dtype):
    """bn-conv-relu folds its norm only where |mean|·rstd <= FOLD_MAX_MEAN_OVER_STD in every
    channel: the C++ test (one call) and the torch one agree on either side of the limit,
    on one bad channel among good ones, on NaN statistics and on no channels at all."""
    bcr = importlib.import_module("fused.bn_conv_relu")
    limit, eps = bcr.FOLD_MAX_MEAN_OVER_STD, 1e-5
    var = torch.full((6,), 4.0, dtype=dtype)
    cases = {"zero mean": torch.zeros(6, dtype=dtype),
             "just inside": torch.full((6,), 0.999 * limit * 2.0, dtype=dtype),
             "just outside": torch.full((6,), 1.001 * limit * 2.0, dtype=dtype),
             "one channel outside": torch.tensor([0, 1, -1, 0, -1.01 * limit * 2.0, 0],
                                                 dtype=dtype),
             "nan mean": torch.tensor([0, float("nan"), 0, 0, 0, 0], dtype=dtype)}
    expected = {"zero mean": True, "just inside": True, "just outside": False,
                "one channel outside": False, "nan mean": False}
    for name, mean in cases.items():
        via_cpp = torch.ops.bnorder_cpu.fold_exact(mean, var, eps, limit)
        via_torch = bool((mean.square() <= (var + eps) * limit ** 2).all())
        assert via_cpp is via_torch is expected[name], name
    nan_var = var.clone()
    nan_var[2] = float("nan")
    assert torch.ops.bnorder_cpu.fold_exact(torch.zeros(6, dtype=dtype), nan_var, eps,
                                            limit) is False
    assert torch.ops.bnorder_cpu.fold_exact(torch.zeros(0), torch.zeros(0), eps, limit) is True
    with pytest.raises(RuntimeError, match="fold_exact"):
        torch.ops.bnorder_cpu.fold_exact(torch.zeros(3), torch.zeros(4), eps, limit)


@pytest.mark.skipif(fused.backend() != "cpp", reason="C++ extension not loaded")
@pytest.mark.parametrize("order", ["conv-bn-relu", "conv-relu-bn"])
def test_cpp_autograd_node_takes_training_calls_only(order):
    """Conv-first units training with batch statistics run as one C++ autograd node
    (csrc/unit.cpp); eval, the affine norm and torch.compile keep the Python op. The node's
    gradients equal the Python op's in float64 (the same C++ calls, composed in C++)."""
    torch.manual_seed(0)
    unit = fused.make_unit(order, 3, 5, 3, padding=1, backend="fused", bias=True).double()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    out = unit.train()(x)
    assert "ConvNormTrain" in out.grad_fn.name()
    assert "ConvNormTrain" not in unit.eval()(x).grad_fn.name()
    affine = fused.make_unit(order, 3, 5, 3, padding=1, backend="fused", norm="affine")
    assert "ConvNormTrain" not in affine.train()(x.float()).grad_fn.name()
    # The same training step through the Python op, which the node replaces in eager mode.
    g = torch.randn_like(out)
    params = [x, unit.conv.weight, unit.conv.bias, unit.norm.weight, unit.norm.bias]
    grads_node = torch.autograd.grad(out, params, g)
    conv, norm = unit.conv, unit.norm
    relu_mode = reference.RELU_AFTER if order == "conv-bn-relu" else reference.RELU_BEFORE
    ctn = importlib.import_module("fused._conv_then_norm")
    out_py = ctn._conv_norm_forward_call(x, conv.weight, conv.bias, [1, 1], [1, 1], [1, 1], 1,
                                         norm.weight, norm.bias, None, None, norm.eps, "bn",
                                         relu_mode, False, -1)[0]
    assert "ConvNormTrain" not in out_py.grad_fn.name()
    torch.testing.assert_close(out, out_py, rtol=0, atol=1e-12)
    for a, b in zip(grads_node, torch.autograd.grad(out_py, params, g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.skipif(fused.backend() != "cpp", reason="C++ extension not loaded")
@pytest.mark.parametrize("order", ORDERS)
def test_cpp_autograd_nodes_keep_saved_tensors_for_retain_graph(order):
    """The C++ nodes write gradients over activations they saved when the graph is freed
    after their backward. With retain_graph=True they must not: a second and a third
    backward through the same graph give bit-identical gradients (the last one frees the
    graph and may write in place)."""
    torch.manual_seed(0)
    unit = fused.make_unit(order, 3, 5, 3, padding=1, backend="fused", bias=True).train()
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    out = unit(x)
    assert "Train" in out.grad_fn.name()  # ConvNormTrain or NormConvTrain
    g = torch.randn_like(out)
    params = [x, *unit.parameters()]
    first = torch.autograd.grad(out, params, g, retain_graph=True)
    second = torch.autograd.grad(out, params, g, retain_graph=True)
    last = torch.autograd.grad(out, params, g)
    for a, b, c in zip(first, second, last):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        torch.testing.assert_close(c, a, rtol=0, atol=0)


@pytest.mark.skipif(fused.backend() != "cpp", reason="C++ extension not loaded")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no-relu"])
@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["folded", "explicit-norm"])
def test_cpp_autograd_node_bn_conv_relu(offset, relu, channels_last):
    """bn-conv-relu training with batch statistics runs as one C++ autograd node, folded or
    (at mean 1e4, where the fold is not exact) with the norm applied explicitly, with and
    without the ReLU, in either layout, and equals the Python op in float64: output and all
    five gradients. Without the ReLU the incoming gradient is a broadcast (non-dense) one, as
    from a sum."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    unit = fused.make_unit("bn-conv-relu", 3, 5, 3, stride=2, padding=1, backend="fused",
                           bias=True, relu=relu).double().train().to(memory_format=fmt)
    x = (torch.randn(4, 3, 7, 7, dtype=torch.float64) + offset).contiguous(
        memory_format=fmt).requires_grad_()
    out = unit(x)
    assert "NormConvTrain" in out.grad_fn.name()
    assert "NormConvTrain" not in unit.eval()(x).grad_fn.name()
    g = torch.randn_like(out) if relu else torch.randn(1, *out.shape[1:]).double().expand_as(out)
    conv, norm = unit.conv, unit.norm
    params = [x, conv.weight, conv.bias, norm.weight, norm.bias]
    grads_node = torch.autograd.grad(out, params, g)
    bcr = importlib.import_module("fused.bn_conv_relu")
    out_py = bcr._norm_conv_forward_call(x, conv.weight, conv.bias, [2, 2], [1, 1], [1, 1], 1,
                                         norm.weight, norm.bias, None, None, norm.eps, "bn",
                                         relu, -1)[0]
    assert "NormConvTrain" not in out_py.grad_fn.name()
    tol = 1e-12 * (1 + offset)
    torch.testing.assert_close(out, out_py, rtol=0, atol=tol)
    for a, b in zip(grads_node, torch.autograd.grad(out_py, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=tol)
