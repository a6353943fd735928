"""Saved-for-backward bytes, fused vs eager (the memory targets of benchmarks/targets.py;
deterministic, so asserted here on small shapes; benchmarks/test_memory.py reports them at
full size)."""
import pytest

import fused
from benchmarks import cases

SHAPE = cases.UnitShape("test", 16, 16, 3, 1, 1, 8)
NORMS = [n for n in fused.NORMS if n != "none"]


# Fused keeps each norm's batch mean and variance in float64 (the centered norm needs the
# mean's digits, fused/_norm.py), eager saves float32 mean and inverse std: 8 bytes more per
# normalized channel, beside activation-sized tensors that must be no larger than eager's.
STATS_EXTRA_BYTES_PER_CHANNEL = 8


def _saved(order, norm, provider):
    mem = cases.unit_memory(SHAPE, order, norm, provider, batch=8, peak=False)
    return cases.activation_bytes(mem["saved_tensors"])


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("order", fused.ORDERS)
def test_unit_fused_saves_no_more_than_eager(order, norm):
    mem = {p: cases.unit_memory(SHAPE, order, norm, p, batch=8, peak=False)
           for p in ("eager", "fused")}
    act = {p: cases.activation_bytes(m["saved_tensors"]) for p, m in mem.items()}
    assert 0 < act["fused"] <= act["eager"], mem
    channels = SHAPE.cin if order == "bn-conv-relu" else SHAPE.cout
    allowance = STATS_EXTRA_BYTES_PER_CHANNEL * channels if norm != "affine" else 0
    assert mem["fused"]["saved_bytes"] <= mem["eager"]["saved_bytes"] + allowance, mem


def test_bn_conv_relu_saves_30_percent_less():
    eager, mine = _saved("bn-conv-relu", "bn", "eager"), _saved("bn-conv-relu", "bn", "fused")
    assert mine <= 0.7 * eager, (mine, eager)


@pytest.mark.parametrize("order", fused.ORDERS)
def test_network_fused_saves_no_more_than_eager(order):
    saved = {p: cases.activation_bytes(cases.network_memory(
        "resnet20", order, "bn", p, batch=2, peak=False)["saved_tensors"])
        for p in ("eager", "fused")}
    assert 0 < saved["fused"] <= saved["eager"], saved
    if order == "bn-conv-relu":
        assert saved["fused"] <= 0.8 * saved["eager"], saved
