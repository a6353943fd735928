"""The implicit-GEMM Triton convolution against F.conv2d and its autograd gradients, and its
fused prologues/epilogues against the unfused composition of reference primitives."""
import pytest
import torch
import torch.nn.functional as F

from fused import _norm, reference as R
from fused.triton import conv as C, primitives as T

pytestmark = pytest.mark.triton

GEOMETRIES = {  # kernel, stride, padding, dilation, (H, W)
    "3x3": (3, 1, 1, 1, (7, 9)), "3x3-s2": (3, 2, 1, 1, (9, 7)),
    "3x3-pad2-dil2": (3, 2, 2, 2, (8, 7)), "1x1": (1, 1, 0, 1, (5, 5)),
    "1x1-s2": (1, 2, 0, 1, (7, 6)), "3x3-pad0": (3, 1, 0, 1, (5, 6)),
}


def _reference_conv(x, w, b, k, stride, pad, dil, g):
    x, w, b = (t.detach().double().requires_grad_() for t in (x, w, b))
    y = F.conv2d(x, w, b, stride, pad, dil)
    y.backward(g.double())
    return y.detach(), x.grad, w.grad, b.grad


def _conv_all(x, w, b, stride, pad, dil, g):
    s, p, d = [stride] * 2, [pad] * 2, [dil] * 2
    y, _ = C.conv_forward(x, w, b, s, p, d)
    dx, _ = C.conv_input_grad(g, w, x, s, p, d)
    dw, db = C.conv_weight_grad(g, x, w, s, p, d)
    return y, dx, dw, db


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_conv_matches_f_conv2d_float64(geometry, channels_last):
    k, stride, pad, dil, hw = GEOMETRIES[geometry]
    x = torch.randn(2, 5, *hw, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 5, k, k, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    expected = _reference_conv(x, w, b, k, stride, pad, dil,
                               g := torch.randn(F.conv2d(x, w, b, stride, pad, dil).shape,
                                                dtype=torch.float64))
    got = _conv_all(x, w, b, stride, pad, dil, g)
    for name, a, e in zip(("y", "dx", "dw", "db"), got, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=name)
    assert got[0].is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["f32", "f16", "bf16"])
def test_conv_precision_within_twice_eager(dtype):
    """Error vs float64 ≤ 2 × eager's own error at the same precision + atol."""
    k, stride, pad, dil, hw = GEOMETRIES["3x3-s2"]
    x, w, b = torch.randn(2, 7, *hw), torch.randn(9, 7, 3, 3) * 0.3, torch.randn(9)
    g = torch.randn(F.conv2d(x, w, b, stride, pad, dil).shape)
    expected = _reference_conv(x, w, b, k, stride, pad, dil, g)
    low = [t.to(dtype) for t in (x, w, b, g)]
    got = _conv_all(low[0], low[1], low[2], stride, pad, dil, low[3])
    xe, we, be = (t.clone().requires_grad_() for t in low[:3])
    ye = F.conv2d(xe, we, be, stride, pad, dil)
    ye.backward(low[3])
    eager = (ye, xe.grad, we.grad, be.grad)
    assert got[0].dtype == got[1].dtype == got[2].dtype == dtype
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    for name, a, e, ref in zip(("y", "dx", "dw", "db"), got, eager, expected):
        err = (a.double() - ref).abs().max().item()
        eager_err = (e.double() - ref).abs().max().item()
        assert err <= 2 * eager_err + atol * ref.abs().max().item(), (name, err, eager_err)


def test_many_programs_k_loops_and_split_k(monkeypatch):
    """Small blocks: many row tiles, several K iterations, and split-K weight gradients."""
    monkeypatch.setattr(C, "INTERPRETER_MAX_ROWS", 16)
    monkeypatch.setattr(C, "INTERPRETER_MAX_CHANNELS", 16)
    monkeypatch.setattr(C, "wgrad_splits", lambda rows, tiles, block_k, gpu: 3)
    k, stride, pad, dil, hw = GEOMETRIES["3x3-s2"]
    x = torch.randn(2, 20, *hw, dtype=torch.float64)
    w, b = torch.randn(18, 20, 3, 3, dtype=torch.float64), torch.randn(18, dtype=torch.float64)
    g = torch.randn(F.conv2d(x, w, b, stride, pad, dil).shape, dtype=torch.float64)
    expected = _reference_conv(x, w, b, k, stride, pad, dil, g)
    for name, a, e in zip(("y", "dx", "dw", "db"), _conv_all(x, w, b, stride, pad, dil, g),
                          expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("relu_mode", [0, 1, 2])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_stats_epilogue_and_dy_prologue(channels_last, relu_mode, monkeypatch):
    """conv → norm: statistics of y / relu(y) from the epilogue, and dgrad/wgrad with
    dy = backward_apply(g, y) formed on load, against the unfused reference."""
    monkeypatch.setattr(C, "INTERPRETER_MAX_ROWS", 16)  # several partial rows to merge
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64) + 3.0
    args = ([2, 2], [1, 1], [1, 1])
    y, parts = C.conv_forward(x, w, b, *args, stats_mode=2 if relu_mode == 2 else 1)
    assert parts[0].shape[0] > 1
    mean, var = T.merge_moments(*parts)
    ref_mean, ref_var = R.stats(y, relu_mode if relu_mode == 2 else 0)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, ref_var, rtol=1e-12, atol=1e-12)

    g = torch.randn_like(y)
    vectors = [ref_mean, torch.rand(5, dtype=torch.float64) + 0.5,
               torch.randn(5, dtype=torch.float64)] + [torch.randn(5, dtype=torch.float64)
                                                       for _ in range(3)]
    dy = R.backward_apply(g, y, *vectors, relu_mode)
    ref_dx, ref_dw, ref_db = torch.ops.aten.convolution_backward(
        dy, x, w, [5], *args, False, [0, 0], 1, [True, True, True])
    fused = dict(prologue=1, saved=y, vectors=vectors, relu_mode=relu_mode)
    dx, _ = C.conv_input_grad(g, w, x, *args, **fused)
    dw, db = C.conv_weight_grad(g, x, w, *args, **fused)
    for name, a, e in (("dx", dx, ref_dx), ("dw", dw, ref_dw), ("db", db, ref_db)):
        torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-11, msg=name)


@pytest.mark.parametrize("padding", [0, 1, 2])
def test_norm_prologue_and_reduce_epilogue(padding):
    """norm → conv: x normalized on load with zero padding in normalized space (= conv of
    the materialized norm(x)), and dgrad's epilogue reducing Σdn, Σdn·(x − mean). The
    prologue takes the norm's affine form, x·s + affine_shift(mean, s, shift)."""
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64) * 2 + 1
    w, b = torch.randn(4, 3, 3, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    scale, shift = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    args = ([1, 2], [padding, padding], [1, 1])
    mean = x.mean((0, 2, 3))
    in_shift = _norm.affine_shift(mean, scale, shift)
    normed = R.apply(x, mean, scale, shift, 0)
    out, _ = C.conv_forward(x, w, b, *args, in_scale=scale, in_shift=in_shift, relu=True)
    torch.testing.assert_close(out, F.relu(F.conv2d(normed, w, b, *args)), rtol=1e-12,
                               atol=1e-12)

    g = torch.randn_like(out)
    g_masked = torch.where(out > 0, g, 0.0)
    ref_dn, ref_dw, ref_db = torch.ops.aten.convolution_backward(
        g_masked, normed, w, [4], *args, False, [0, 0], 1, [True, True, True])
    dn, sums = C.conv_input_grad(g, w, x, *args, prologue=2, saved=out, reduce_mean=mean)
    torch.testing.assert_close(dn, ref_dn, rtol=1e-12, atol=1e-12)
    for got, exp in zip(sums, R.backward_reduce(ref_dn, x, mean, scale, shift, 0)):
        torch.testing.assert_close(got, exp, rtol=1e-11, atol=1e-11)
    dw, db = C.conv_weight_grad(g, x, w, *args, prologue=2, saved=out, in_scale=scale,
                                in_shift=in_shift)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(db, ref_db, rtol=1e-11, atol=1e-11)


def test_conv_impl_selection(monkeypatch):
    x, w = torch.randn(2, 16, 8, 8), torch.randn(16, 16, 3, 3)
    assert C.select(x, w, 1) == "triton"                      # short 3x3 GEMM
    assert C.select(x, torch.randn(16, 16, 5, 5), 1) == "aten"
    assert C.select(torch.randn(2, 128, 8, 8), torch.randn(16, 128, 3, 3), 1) == "aten"
    assert C.select(x.double(), w.double(), 1) == "aten"
    assert C.select(x, torch.randn(16, 8, 3, 3), 2) == "aten"  # groups: ATen only
    monkeypatch.setenv("BNORDER_CONV_IMPL", "aten")
    assert C.select(x, w, 1) == "aten"
    monkeypatch.setenv("BNORDER_CONV_IMPL", "triton")
    assert C.select(torch.randn(2, 128, 8, 8), torch.randn(16, 128, 3, 3), 1) == "triton"
    monkeypatch.setenv("BNORDER_CONV_IMPL", "cudnn")
    with pytest.raises(ValueError, match="BNORDER_CONV_IMPL"):
        C.select(x, w, 1)
