"""The Triton primitives against fused/reference.py, element by element."""
import pytest
import torch

from fused import reference as R
from fused.triton import _common, primitives as T

pytestmark = pytest.mark.triton

DTYPES = {"f64": torch.float64, "f32": torch.float32, "f16": torch.float16,
          "bf16": torch.bfloat16}
# Rounding one result to the output dtype: ≤ 1 ulp relative to the largest value.
OUT_RTOL = {torch.float64: 1e-13, torch.float32: 2e-7, torch.float16: 1e-3,
            torch.bfloat16: 8e-3}


def _inputs(dtype, channels_last, shape=(3, 5, 7, 9), mean=0.0):
    t = (torch.randn(*shape, dtype=torch.float64) * 2 + mean).to(dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    acc = _common.acc_dtype(t)
    c = shape[1]
    vectors = dict(mean=torch.randn(c, dtype=acc), scale=torch.rand(c, dtype=acc) + 0.5,
                   shift=torch.randn(c, dtype=acc), k1=torch.randn(c, dtype=acc),
                   k2=torch.randn(c, dtype=acc), k3=torch.randn(c, dtype=acc))
    return t, torch.randn_like(t), vectors


def _close(actual, expected, rtol):
    scale = expected.double().abs().max().item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0,
                               atol=rtol * max(scale, 1e-30))


@pytest.mark.parametrize("relu_mode", [0, 1, 2])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_primitives_match_reference(dtype, channels_last, relu_mode):
    t, g, v = _inputs(dtype, channels_last)
    acc_tol = 1e-13 if dtype == torch.float64 else 1e-6
    # Reductions: float32 rounding scales with the summed magnitudes, not with the result.
    mean, var = T.stats(t, relu_mode)
    ref_mean, ref_var = R.stats(t.double(), relu_mode)  # exact for the rounded inputs
    assert mean.dtype == var.dtype == _common.acc_dtype(t)
    data = t.double().abs().max().item()
    torch.testing.assert_close(mean.double(), ref_mean, rtol=0, atol=acc_tol * data)
    torch.testing.assert_close(var.double(), ref_var, rtol=0, atol=acc_tol * data ** 2)

    out = T.apply(t, v["mean"], v["scale"], v["shift"], relu_mode)
    assert out.dtype == t.dtype and out.stride() == t.stride()
    _close(out, R.apply(t, v["mean"], v["scale"], v["shift"], relu_mode), OUT_RTOL[dtype])

    sums = T.backward_reduce(g, t, v["mean"], v["scale"], v["shift"], relu_mode)
    ref_sums = R.backward_reduce(g.double(), t.double(), v["mean"].double(),
                                 v["scale"].double(), v["shift"].double(), relu_mode)
    magnitude = (g.double() * (t.double().abs() + 1)).abs().sum((0, 2, 3)).max().item()
    for got, exp in zip(sums, ref_sums):
        assert got.dtype == _common.acc_dtype(t)
        torch.testing.assert_close(got.double(), exp, rtol=0, atol=acc_tol * magnitude)

    dt = T.backward_apply(g, t, *v.values(), relu_mode)
    assert dt.dtype == t.dtype and dt.stride() == t.stride()
    _close(dt, R.backward_apply(g, t, *v.values(), relu_mode), OUT_RTOL[dtype])


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 1, 1), (4, 1, 5, 3), (2, 6)],
                         ids=["one", "hw1", "c1", "2d"])
def test_odd_shapes(shape):
    t = torch.randn(*shape)
    mean, var = T.stats(t, 0)
    ref_mean, ref_var = R.stats(t, 0)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)


def test_many_tiles_merge_like_one(monkeypatch):
    """Small tiles force the Chan merge inside a program and across many partial rows."""
    t, g, v = _inputs(torch.float32, False, shape=(3, 5, 13, 11), mean=1e4)
    ct, cg = (u.contiguous(memory_format=torch.channels_last) for u in (t, g))
    expected = [R.stats(t.double(), 2),
                R.backward_reduce(g.double(), t.double(), v["mean"].double(),
                                  v["scale"].double(), v["shift"].double(), 1)]
    monkeypatch.setattr(_common, "TILE_ELEMS_INTERPRETER", 32)
    for tt, gg in ((t, g), (ct, cg)):
        geo = _common.geometry(tt, "test")
        assert _common.tiling(geo, True, gpu=False, dtype=t.dtype).tiles_per_split > 1 or tt is ct
        got = [T.stats(tt, 2), T.backward_reduce(gg, tt, v["mean"], v["scale"], v["shift"], 1)]
        for pair, ref_pair in zip(got, expected):
            for a, b in zip(pair, ref_pair):
                _close(a, b, 1e-6)


def test_variance_is_stable_far_from_zero():
    """mean 1e4, std 1 in float32: E[t²] − E[t]² would lose every digit."""
    t = torch.randn(4, 3, 16, 16, dtype=torch.float64) + 1e4
    mean, var = T.stats(t.float(), 0)
    ref_mean, ref_var = R.stats(t.float().double(), 0)
    eager_var = torch.var_mean(t.float(), dim=(0, 2, 3), correction=0)[0]
    err = (var.double() - ref_var).abs().max().item()
    assert err <= 2 * (eager_var.double() - ref_var).abs().max().item() + 1e-6
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-7, atol=0)


def test_deterministic():
    t, g, v = _inputs(torch.float32, True, shape=(4, 7, 9, 9))
    first = (T.stats(t, 1), T.backward_reduce(g, t, v["mean"], v["scale"], v["shift"], 2))
    second = (T.stats(t, 1), T.backward_reduce(g, t, v["mean"], v["scale"], v["shift"], 2))
    for a, b in zip(first, second):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_nan_propagates_like_reference():
    t = torch.randn(2, 3, 4, 4)
    t[0, 1, 2, 2] = float("nan")
    m, s, b = torch.zeros(3), torch.ones(3), torch.zeros(3)
    for mode in (0, 1, 2):
        assert torch.equal(T.apply(t, m, s, b, mode).isnan(), R.apply(t, m, s, b, mode).isnan())
        assert torch.equal(T.stats(t, mode)[1].isnan(), R.stats(t, mode)[1].isnan())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_float64_mean_is_rounded_to_the_accumulation_dtype(dtype):
    """A float64 mean (the C++ backend's, or the ops' saved batch mean) gives exactly what
    the mean rounded to float32 gives: the Triton path normalizes with the float32 mean."""
    t, g, v = _inputs(dtype, False)
    wide = v["mean"].double() + 1e-9  # digits that float32 does not keep
    rounded = wide.float()
    for mode in (0, 1, 2):
        assert torch.equal(T.apply(t, wide, v["scale"], v["shift"], mode),
                           T.apply(t, rounded, v["scale"], v["shift"], mode))
        for a, b in zip(T.backward_reduce(g, t, wide, v["scale"], v["shift"], mode),
                        T.backward_reduce(g, t, rounded, v["scale"], v["shift"], mode)):
            assert torch.equal(a, b)
        ks = (v["k1"], v["k2"], v["k3"])
        assert torch.equal(T.backward_apply(g, t, wide, v["scale"], v["shift"], *ks, mode),
                           T.backward_apply(g, t, rounded, v["scale"], v["shift"], *ks, mode))


def test_apply_is_centered_far_from_zero():
    """mean 1e4, std 1 in float32: (t − mean)·s + shift keeps each output to ~1 ulp of its
    own size; the affine form t·s + (shift − mean·s) would be off by ~ulp(1e4·s) ≈ 1e-3·s."""
    t = (torch.randn(2, 3, 8, 8, dtype=torch.float64) + 1e4).float()
    mean = t.double().mean((0, 2, 3)).float()
    scale, shift = torch.rand(3) + 0.5, torch.randn(3)
    expected = ((t.double() - mean.double()[:, None, None]) * scale.double()[:, None, None]
                + shift.double()[:, None, None])
    _close(T.apply(t, mean, scale, shift, 0), expected, OUT_RTOL[torch.float32])


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_relu_after_mask_is_the_forward_relu(channels_last):
    """relu_mode 1: the backward's mask [(t − mean)·s + shift > 0] is bit for bit where the
    forward's ReLU let the value through, also for values whose pre-activation is 0 or
    within rounding of it (t at the mean)."""
    t, g, v = _inputs(torch.float32, channels_last, shape=(3, 5, 7, 9))
    mean = t[0, :, 0, 0].clone()            # some values sit exactly at the mean
    t[1, :, 2, 3] = mean + 1e-6 * mean.abs()  # and some one or two ulps from it
    shift = torch.zeros(5)
    shift[1] = 1e-7
    out = T.apply(t, mean, v["scale"], shift, 1)
    ones, zeros = torch.ones(5), torch.zeros(5)
    masked = T.backward_apply(g, t, mean, v["scale"], shift, ones, zeros, zeros, 1)
    assert torch.equal(masked, torch.where(out > 0, g, 0.0))
    sum_g, _ = T.backward_reduce(g, t, mean, v["scale"], shift, 1)
    torch.testing.assert_close(sum_g, masked.sum((0, 2, 3)), rtol=0, atol=1e-5)


def test_gradient_in_other_layout_is_accepted():
    t, g, v = _inputs(torch.float32, True)
    expected = T.backward_apply(g, t, *v.values(), 1)
    got = T.backward_apply(g.contiguous(), t, *v.values(), 1)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("call, error, match", [
    (lambda t, v: T.stats(t, 3), ValueError, "relu_mode"),
    (lambda t, v: T.stats(t.transpose(2, 3), 0), ValueError, "contiguous or channels_last"),
    (lambda t, v: T.stats(t[0, 0, 0], 0), ValueError, "channel dimension"),
    (lambda t, v: T.apply(t, v["mean"], v["scale"][:2], v["shift"], 0), ValueError,
     r"shape \(5,\)"),
    (lambda t, v: T.apply(t, v["mean"][:2], v["scale"], v["shift"], 0), ValueError,
     r"mean must have shape \(5,\)"),
    (lambda t, v: T.apply(t, v["mean"], v["scale"].double(), v["shift"], 0), ValueError,
     "float32"),
    (lambda t, v: T.apply(t, v["mean"].half(), v["scale"], v["shift"], 0), ValueError,
     "mean must be torch.float32 or torch.float64"),
    (lambda t, v: T.backward_apply(t, t, v["mean"], v["scale"], v["shift"].double(),
                                   v["k1"], v["k2"], v["k3"], 0), ValueError, "shift must be"),
    (lambda t, v: T.backward_apply(t[:1], t, *v.values(), 0), ValueError, "gradient size"),
    (lambda t, v: T.backward_reduce(t.half(), t, v["mean"], v["scale"], v["shift"], 0),
     ValueError, "gradient dtype"),
    (lambda t, v: T.stats(t.long(), 0), ValueError, "floating-point"),
])
def test_bad_input_raises_clear_error(call, error, match):
    t, _, v = _inputs(torch.float32, False)
    with pytest.raises(error, match=match):
        call(t, v)


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        T.stats(torch.randn(2, 3, 4, 4), 0)
