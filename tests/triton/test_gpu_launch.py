"""The launches a GPU makes, checked numerically in the interpreter (FUSED_TRITON_LAUNCH=gpu):
BN tiles ≤ 4096 elements with split reductions, convolution blocks of 16-64, split-K weight
gradients, float16/bfloat16 dots on their own dtype and TF32 for float32 when
torch.backends.cudnn.allow_tf32 is set (its default). Every test records the launches it
made and checks that they carry the GPU's parameters, so none passes on interpreter-sized
launches by accident. Shapes are small: GPU blocks mean many program instances here."""
import pytest
import torch
import torch.nn.functional as F

import fused
from fused import reference as R
from fused.triton import _common, conv as C, conv_kernels as CK, norm_kernels as NK
from fused.triton import primitives as T
from tests import test_ops as shared
from tests.helpers import Case
from tests.triton import test_conv as conv_tests

pytestmark = pytest.mark.triton

# Largest relative error of a TF32 result, as a share of Σ|a||b| over its products: each
# operand loses its low 13 mantissa bits (< 2^-10 relatively), a product so < 2^-9.
TF32_BOUND = 2.0 ** -9


class _Recorder:
    def __init__(self, kernel, name, sink):
        self.kernel, self.name, self.sink = kernel, name, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append((self.name, tuple(grid), kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def launches(monkeypatch):
    """FUSED_TRITON_LAUNCH=gpu, and the list of (kernel, grid, constexprs) launched."""
    monkeypatch.setenv(_common.LAUNCH_ENV, "gpu")
    sink = []
    for module, names in ((CK, ("conv_fwd_kernel", "conv_dgrad_kernel", "conv_wgrad_kernel")),
                          (NK, ("stats_partial_kernel", "apply_kernel",
                                "backward_reduce_kernel", "backward_apply_kernel"))):
        for name in names:
            monkeypatch.setattr(module, name, _Recorder(getattr(module, name), name, sink))
    return sink


@pytest.fixture
def tf32(request):
    """torch.backends.cudnn.allow_tf32 set to the parameter for one test."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = request.param
    yield request.param
    torch.backends.cudnn.allow_tf32 = before


def _assert_gpu_shaped(sink, *, tf32=None):
    assert sink, "no Triton kernel was launched"
    for name, grid, meta in sink:
        if name.startswith("conv"):
            for block in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
                assert 16 <= meta[block] <= C.GPU_MAX_ROWS, (name, block, meta[block])
            if tf32 is not None:
                assert meta["PRECISION"] == ("tf32" if tf32 else "ieee"), (name, meta)
        else:
            assert meta["BLOCK_I"] * meta["BLOCK_C"] <= _common.TILE_ELEMS_GPU, (name, meta)


def test_switch_reads_the_environment(monkeypatch):
    x = torch.randn(2, 3, 4, 4)
    monkeypatch.delenv(_common.LAUNCH_ENV, raising=False)
    assert not _common.gpu_launch(x)
    monkeypatch.setenv(_common.LAUNCH_ENV, "gpu")
    assert _common.gpu_launch(x)
    monkeypatch.setenv(_common.LAUNCH_ENV, "cuda")
    with pytest.raises(ValueError, match="FUSED_TRITON_LAUNCH='cuda' is not one of"):
        _common.gpu_launch(x)


def test_configs_differ_between_gpu_and_interpreter():
    """The shape used below gets other launches on a GPU than in the interpreter."""
    gpu = C.weight_grad_config(2, 20, 70, 3, 3, 11, 11, torch.float32, gpu=True)
    interp = C.weight_grad_config(2, 20, 70, 3, 3, 11, 11, torch.float32, gpu=False)
    assert gpu.splits > 1 and interp.splits == 1
    assert gpu.meta["BLOCK_K"] <= 64 and interp.meta["BLOCK_K"] >= 2 * 11 * 11  # one block
    fwd = C.forward_config(2, 20, 70, 11, 11, torch.float32, gpu=True)
    assert fwd.grid == (4, 2) and fwd.meta["BLOCK_K"] < 20  # several K iterations
    assert C.forward_config(2, 20, 70, 11, 11, torch.float16, gpu=True).meta["PRECISION"] \
        == "ieee"


def _conv_case(dtype, channels_last):
    x = torch.randn(2, 20, 11, 11, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(70, 20, 3, 3, dtype=torch.float64) * 0.1
    b = torch.randn(70, dtype=torch.float64)
    g = torch.randn(2, 70, 11, 11, dtype=torch.float64)
    return x, w, b, g


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_conv_float64_exact_with_gpu_blocks_and_split_k(channels_last, launches):
    x, w, b, g = _conv_case(torch.float64, channels_last)
    expected = conv_tests._reference_conv(x, w, b, 3, 1, 1, 1, g)
    got = conv_tests._conv_all(x, w, b, 1, 1, 1, g)
    for name, a, e in zip(("y", "dx", "dw", "db"), got, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=name)
    _assert_gpu_shaped(launches)
    wgrad = [grid for name, grid, _ in launches if name == "conv_wgrad_kernel"]
    splits = C.weight_grad_config(2, 20, 70, 3, 3, 11, 11, torch.float64, gpu=True).splits
    assert splits > 1 and wgrad and wgrad[0][2] == 9 * splits  # taps × split-K slices


@pytest.mark.parametrize("tf32", [False], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["f32-ieee", "f16", "bf16"])
def test_conv_low_precision_within_twice_eager(dtype, tf32, launches):
    conv_tests.test_conv_precision_within_twice_eager(dtype)
    _assert_gpu_shaped(launches, tf32=False)


def _abs_conv(x, w, g):
    """Σ|a||b| over the products behind each y, dx and dW element (float64)."""
    xa, wa = x.abs().requires_grad_(), w.abs().requires_grad_()
    y = F.conv2d(xa, wa, None, 1, 1)
    y.backward(g.abs())
    return y.detach(), xa.grad, wa.grad


@pytest.mark.parametrize("tf32", [True, False], indirect=True, ids=["tf32", "ieee"])
def test_conv_float32_error_bound(tf32, launches):
    """float32 convolution against float64: with TF32 (cudnn.allow_tf32, the default) each
    result is within 2^-9 · Σ|a||b| (+ float32 summation, K · 2^-24 · Σ|a||b|) and is
    measurably worse than IEEE float32; without, it is float32-exact."""
    x, w, b, g = _conv_case(torch.float64, False)
    expected = conv_tests._reference_conv(x, w, b, 3, 1, 1, 1, g)
    scale = _abs_conv(x, w, g)
    xf, wf, bf, gf = (t.float() for t in (x, w, b, g))
    got = conv_tests._conv_all(xf, wf, bf, 1, 1, 1, gf)
    lengths = (20 * 9, 70 * 9, 2 * 11 * 11)  # reduction length of y, dx, dW
    worst = []
    for name, a, e, s, k in zip(("y", "dx", "dw"), got, expected, scale, lengths):
        share = ((a.double() - e).abs() / s.clamp_min(1e-30)).max().item()
        worst.append(share)
        assert share <= (TF32_BOUND if tf32 else 0) + k * 2.0 ** -24, (name, share)
    if tf32:
        assert min(worst) > 2.0 ** -14, worst  # far above IEEE float32 rounding: TF32 ran
    _assert_gpu_shaped(launches, tf32=tf32)


@pytest.mark.parametrize("channels_last, relu_mode", [(False, 0), (False, 2), (True, 1)],
                         ids=["nchw-0", "nchw-2", "nhwc-1"])
def test_primitives_with_gpu_tiles(channels_last, relu_mode, launches):
    """Several GPU tiles per channel and split reductions (NCHW: 1024-element rows of 1089;
    channels_last: 128 channels of 130, 32-row tiles), against the float64 reference."""
    if channels_last:
        t = (torch.randn(2, 130, 9, 9, dtype=torch.float64) * 2 + 3).contiguous(
            memory_format=torch.channels_last)
    else:
        t = torch.randn(2, 20, 33, 33, dtype=torch.float64) * 2 + 3
    g = torch.randn_like(t)
    c = t.shape[1]
    mean, scale, shift, k1, k2, k3 = (torch.randn(c, dtype=torch.float64) for _ in range(6))
    got = [T.stats(t, relu_mode), T.apply(t, mean, scale, shift, relu_mode),
           T.backward_reduce(g, t, mean, scale, shift, relu_mode),
           T.backward_apply(g, t, mean, scale, shift, k1, k2, k3, relu_mode)]
    expected = [R.stats(t, relu_mode), R.apply(t, mean, scale, shift, relu_mode),
                R.backward_reduce(g, t, mean, scale, shift, relu_mode),
                R.backward_apply(g, t, mean, scale, shift, k1, k2, k3, relu_mode)]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    _assert_gpu_shaped(launches)
    stats_grid = next(grid for name, grid, _ in launches if name == "stats_partial_kernel")
    assert stats_grid[0] > 2 and stats_grid[1] > 1  # several partial tiles, channel blocks


@pytest.mark.parametrize("order", fused.ORDERS)
def test_units_float64_exact(order, launches, monkeypatch):
    monkeypatch.setenv("BNORDER_CONV_IMPL", "triton")
    shared.compare(Case(order, "bn", True, dtype=torch.float64, bias=False, stride=2,
                        channels_last=order == "conv-relu-bn"), rtol=1e-10, grad_rtol=1e-10)
    _assert_gpu_shaped(launches)


@pytest.mark.parametrize("tf32", [False], indirect=True)
@pytest.mark.parametrize("order", fused.ORDERS)
def test_units_float32_ieee(order, tf32, launches, monkeypatch):
    """float32 at the standard tolerances once TF32 is off."""
    monkeypatch.setenv("BNORDER_CONV_IMPL", "triton")
    shared.compare(Case(order, "bn", True))
    _assert_gpu_shaped(launches, tf32=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_units_low_precision_within_twice_eager(dtype, launches, monkeypatch):
    monkeypatch.setenv("BNORDER_CONV_IMPL", "triton")
    shared.test_low_precision_error_within_twice_eager("conv-bn-relu", dtype)
    _assert_gpu_shaped(launches)
