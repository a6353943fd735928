"""The fused ops, modules and torch.compile on the Triton backend (interpreter), against the
float64 eager reference: the checks of tests/test_ops.py, run with FUSED_BACKEND=triton and
both convolution implementations (BNORDER_CONV_IMPL=triton: the fused implicit-GEMM
convolution; aten: ATen's convolution + the Triton primitives)."""
import pytest
import torch

import fused
from fused import _backend
from tests import test_ops as shared
from tests.helpers import FUNCTIONALS, Case, make_tensors

pytestmark = pytest.mark.triton

ORDERS, NORMS = fused.ORDERS, fused.NORMS


@pytest.fixture(params=["triton", "aten"], ids=["tconv", "aten"])
def conv_impl(request, monkeypatch):
    monkeypatch.setenv("BNORDER_CONV_IMPL", request.param)
    return request.param


@pytest.fixture
def triton_conv(monkeypatch):
    monkeypatch.setenv("BNORDER_CONV_IMPL", "triton")


def test_backend_is_triton_and_conv_impl_follows_env(monkeypatch):
    x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    assert fused.backend() == "triton"
    monkeypatch.setenv("BNORDER_CONV_IMPL", "triton")
    assert _backend.conv_impl(x, w, 1) == "triton"
    monkeypatch.setenv("BNORDER_CONV_IMPL", "aten")
    assert _backend.conv_impl(x, w, 1) == "aten"
    monkeypatch.setenv("FUSED_BACKEND", "auto")  # CPU tensors: C++ path, ATen conv
    monkeypatch.setenv("BNORDER_CONV_IMPL", "triton")
    assert _backend.conv_impl(x, w, 1) == "aten"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("order", ORDERS)
def test_matrix_triton_conv(order, norm, training, channels_last, triton_conv):
    shared.compare(Case(order, norm, training, channels_last))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("norm", ["bn", "bn-minus", "affine"])
@pytest.mark.parametrize("order", ORDERS)
def test_matrix_aten_conv(order, norm, training, monkeypatch):
    monkeypatch.setenv("BNORDER_CONV_IMPL", "aten")
    shared.compare(Case(order, norm, training))


GEOMETRY_CASES = {  # stride 2, odd and single channels, padding borders, 1x1, H = W = 1
    "s2-odd-nhwc": dict(stride=2, c_in=2, c_out=3, hw=(9, 7)),
    "pad2-dil2": dict(padding=2, dilation=2, hw=(6, 7), c_out=7),
    "pad0-s2-c1": dict(padding=0, stride=2, hw=(8, 9), c_in=1),
    "1x1-hw1": dict(kernel=1, padding=0, hw=(1, 1), n=5),
    "1x1-s2": dict(kernel=1, padding=0, stride=2, hw=(5, 6), c_out=1),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("geometry", list(GEOMETRY_CASES))
@pytest.mark.parametrize("order", ORDERS)
def test_geometries(order, geometry, training, triton_conv):
    shared.compare(Case(order, "bn", training, channels_last=geometry.endswith("nhwc"),
                        **GEOMETRY_CASES[geometry]))


@pytest.mark.parametrize("order", ORDERS)
def test_float64_exact(order, conv_impl):
    shared.compare(Case(order, "bn", True, dtype=torch.float64, bias=False, stride=2),
                   rtol=1e-10, grad_rtol=1e-10)


@pytest.mark.parametrize("order", ORDERS)
def test_running_stats_over_steps(order, triton_conv):
    shared.test_running_stats_over_steps(order)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("order", ORDERS)
def test_low_precision_error_within_twice_eager(order, dtype, conv_impl):
    shared.test_low_precision_error_within_twice_eager(order, dtype)


@pytest.mark.parametrize("norm", ["bn", "bn-minus"])
@pytest.mark.parametrize("order", ORDERS)
def test_mean_1e4_data_is_as_exact_as_eager(order, norm, conv_impl):
    shared.check_mean_1e4(order, norm, 0)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "cumulative"])
@pytest.mark.parametrize("order", ORDERS)
def test_module_training_steps_match_eager(order, momentum, triton_conv):
    shared.test_module_training_steps_match_eager(order, momentum)


def test_compile_fullgraph_stack_matches_eager(conv_impl):
    shared.test_compile_fullgraph_stack_matches_eager()


@pytest.mark.parametrize("order", [
    pytest.param("conv-bn-relu", marks=pytest.mark.slow),
    pytest.param("conv-relu-bn", marks=pytest.mark.slow), "bn-conv-relu"])
def test_gradcheck_fast_float64(order, triton_conv):
    """gradcheck's fast mode (random projections): a handful of interpreter runs per input."""
    case = Case(order, "bn", True, n=2, c_in=2, c_out=3, hw=(4, 4), stride=2)
    t = make_tensors(case)
    inputs = [t[k].clone().requires_grad_() for k in ("x", "weight", "bias", "norm_weight",
                                                      "norm_bias")]

    def fn(x, w, b, gamma, beta):
        return FUNCTIONALS[order](x, w, b, 2, 1, 1, 1, t["running_mean"].clone(),
                                  t["running_var"].clone(), gamma, beta, True)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("order", ORDERS)
def test_gradcheck_full_float64(order, training, triton_conv):
    shared.test_gradcheck_float64(order, training)


@pytest.mark.parametrize("sample", [0, 5])
def test_opcheck_unit_ops(sample, triton_conv):
    shared.test_opcheck_unit_ops(sample)


@pytest.mark.slow
@pytest.mark.parametrize("sample", [1, 2, 3, 4])
def test_opcheck_unit_ops_all(sample, conv_impl):
    shared.test_opcheck_unit_ops(sample)


@pytest.mark.parametrize("order", ORDERS)
def test_nan_propagates_like_eager(order, triton_conv):
    shared.test_nan_propagates_like_eager(order)
