"""Tensors whose row count N·H·W or per-sample size reaches 2^31 are refused with a named
error: the Triton kernels index those in int32 (meta tensors: nothing is allocated)."""
import pytest
import torch

from fused.triton import _common


@pytest.mark.parametrize("shape", [(1, 1, 2 ** 16, 2 ** 15),       # 2^31 rows, 1 channel
                                   (2, 2 ** 16, 2 ** 8, 2 ** 7)])  # 2^31 elements per sample
def test_int32_overflow_is_refused(shape):
    t = torch.empty(shape, device="meta")
    with pytest.raises(ValueError, match=r"stats: .* int32 \(limit 2\^31 − 1\)"):
        _common.check_index_range("stats", t)
    with pytest.raises(ValueError, match="int32"):
        _common.geometry(t, "stats")


def test_just_below_the_limit_is_accepted():
    t = torch.empty((1, 1, 2 ** 15, 2 ** 16 - 1), device="meta")
    _common.check_index_range("stats", t)
    assert _common.geometry(t, "stats").inner == 2 ** 15 * (2 ** 16 - 1)
