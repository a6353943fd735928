"""Saved-for-backward bytes, fused vs eager (the memory targets of benchmarks/targets.py;
deterministic, so asserted here on small shapes; benchmarks/test_memory.py reports them at
full size)."""
import pytest

import fused
from benchmarks import cases

SHAPE = cases.UnitShape("test", 16, 16, 3, 1, 1, 8)
NORMS = [n for n in fused.NORMS if n != "none"]


def _saved(order, norm, provider):
    return cases.unit_memory(SHAPE, order, norm, provider, batch=8, peak=False)["saved_bytes"]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("order", fused.ORDERS)
def test_unit_fused_saves_no_more_than_eager(order, norm):
    mem = {p: cases.unit_memory(SHAPE, order, norm, p, batch=8, peak=False)
           for p in ("eager", "fused")}
    assert mem["fused"]["saved_bytes"] <= mem["eager"]["saved_bytes"], mem


def test_bn_conv_relu_saves_30_percent_less():
    eager, mine = _saved("bn-conv-relu", "bn", "eager"), _saved("bn-conv-relu", "bn", "fused")
    assert mine <= 0.7 * eager, (mine, eager)


@pytest.mark.parametrize("order", fused.ORDERS)
def test_network_fused_saves_no_more_than_eager(order):
    saved = {p: cases.network_memory("resnet20", order, "bn", p, batch=2,
                                     peak=False)["saved_bytes"] for p in ("eager", "fused")}
    assert saved["fused"] <= saved["eager"], saved
    if order == "bn-conv-relu":
        assert saved["fused"] <= 0.8 * saved["eager"], saved
