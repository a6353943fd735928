"""Whole fused networks against a float64 eager copy, every network × order × norm.

A unit can be right alone and wrong inside a network (inputs produced by another fused unit,
gradients that arrive summed over a residual, buffers reused between nodes, the order in
which backward nodes run), so here the fused float32 network's output, input gradient, every
parameter gradient and every running statistic after one training step must lie within twice
eager float32's own error of the float64 result, plus a floor of FLOOR times the tensor's
scale, at 1 and 2 threads, for seeds drawn by hypothesis.

Both float32 networks are measured against the float64 network evaluated on their own ReLU
and max-pool branches (tests/network_reference.py says why: a value within rounding of a
kink may fall on either side, and the side taken changes the gradient by O(1)).

Batch 16: the fully connected units' norms reduce over the batch alone, and at batch 4
(4 values per channel) the norm's backward cancels most of its input; eager float32's own
gradient errors there reach 1e-5 to 1e-4 of scale, and which implementation rounds worse is
a coin toss (small CNN, conv-relu-bn, seed 1834: fused 2.5x eager on 5 tensors at batch 4,
within 2x at batch 16). The large networks run at width 0.25 (every block, pool, shortcut and
the values per channel of each norm as at full width, a sixteenth of the arithmetic) and
only under `slow`; the ImageNet-stem ResNets take 64x64 inputs, so that layer4's norms see
more than one value per channel and image.

Each network is stepped on its input and on ROUNDING_DRAWS − 1 copies of it with every
element moved one ulp, and each tensor's error is the largest over those steps, eager's and
fused's alike. One step's error is a sample, not a measure: where a norm sees few or nearly
equal values per channel (a channel that the ReLU before it leaves almost empty, a fully
connected unit's norm over the batch alone), the network multiplies its rounding by 1/std
of that channel, and whether the roundings of dozens of units add up or cancel there is
chance. Eager float32's own error varies that way: VGG-16, conv-relu-bn, seed 2, over the
input and three one-ulp moves of it, 19x on the output and input gradient; at seed 0 eager's
channels_last step errs 5.0e-3 on the output where its NCHW step errs 4.7e-5. Compared
draw by draw, whichever implementation's roundings happened to cancel wins by 2-6x: over
108 single-step draws of six networks, fused lost by more than 2x in 15 and eager in 5
(before the fix below). The largest of three steps
measures each implementation's rounding at that point; a wrong coefficient, mask or buffer
is 1e-3 of scale or more, far beyond it (the tamper tests below).

What this test found, and what was fixed: the norm's per-channel coefficients (scale,
shift, and backward's k2, k3) were computed in float32 with four roundings each, eager's
with two; a scale's rounding is one relative error on its whole channel, which the next
convolution sums in phase, so it moved networks' outputs 2-3x more than the same size of
independent rounding (VGG-16 conv-relu-bn seed 0: output 1.27e-4 against eager's 4.7e-5,
nearly all from one channel with std 3.8e-3). They are now computed in float64 and
rounded once (csrc/norm.cpp, fused/_norm.py): 6.9e-5. bn-conv-relu's fold costs 1.3x
eager's rounding per unit on ReLU outputs, a documented trade (fused/bn_conv_relu.py;
FOLD_ROUNDING below says how those cells are held).

Every unit is also checked alone, on the exact activations and gradients it meets inside
the network, with one step each (the last test of this file): both implementations then
see bit-identical inputs, and the 2x-eager bound holds draw by draw.
"""
from __future__ import annotations

import contextlib
import copy
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import fused
import models
from tests.network_reference import errors_against_float64, unit_activations

pytestmark = pytest.mark.skipif(fused.extension_error() is not None,
                                reason="the C++ extension did not build")

# Relative to each tensor's largest float64 value: about 8 float32 ulps of scale. Rounding
# that is merely different from eager's (another summation order) stays below it; a wrong
# mask, coefficient or buffer is 1e-3 of scale or more.
FLOOR = 1e-6
# Evaluations per network and draw (the input and ROUNDING_DRAWS − 1 one-ulp moves of it);
# the module docstring says why one is not enough.
ROUNDING_DRAWS = 3
NORMS = ("bn", "bn-minus", "affine")
BATCH = 16

NETWORKS = {  # name: (build options, input side)
    "cnn": ({}, 32),
    "resnet20": ({}, 32),
    "alexnet": ({"width": 0.25}, 32),
    "vgg16": ({"width": 0.25}, 32),
    "resnet18": ({"width": 0.25}, 64),
    "resnet34": ({"width": 0.25}, 64),
    "resnet50": ({"width": 0.25}, 64),
    "resnet101": ({"width": 0.25}, 64),
}
SLOW = {"alexnet", "vgg16", "resnet18", "resnet34", "resnet50", "resnet101"}


def cases():
    for name in NETWORKS:
        for order in fused.ORDERS:
            for norm in NORMS:
                yield pytest.param(name, order, norm,
                                   marks=[pytest.mark.slow] if name in SLOW else [],
                                   id=f"{name}-{order}-{norm}")


def test_every_network_is_covered():
    assert set(NETWORKS) == set(models.NAMES)


def scale_of(key: str, errors: dict) -> float:
    """The scale a key's error is measured against: a running mean against its running
    variance's (a mean near 0 of data of unit spread is as exact as that spread allows, not
    as its own small value), everything else against its own largest value."""
    if key.endswith(".running_mean"):
        return max(errors[key][1], errors[key.removesuffix("mean") + "var"][1] ** 0.5)
    if key.endswith(".conv.bias"):
        # A conv bias that a batch norm follows has gradient Σdy = 0 exactly, while its
        # rounding noise is that of the weight gradient's reduction over dy (helpers).
        return max(errors[key][1], errors[key.removesuffix("bias") + "weight"][1])
    return errors[key][1]


@contextlib.contextmanager
def networks(name: str, order: str, norm: str, seed: int, threads: int, tamper=None):
    """(eager, fused network with the same state, build options, input side), built after
    torch.manual_seed(seed) and used at `threads` threads (restored on exit)."""
    options, side = NETWORKS[name]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        kw = dict(order=order, norm=norm, in_channels=3, num_classes=10, **options)
        eager = models.build(name, backend="eager", **kw)
        fused_net = models.build(name, backend="fused", **kw)
        fused_net.load_state_dict(eager.state_dict())
        if tamper is not None:
            tamper(fused_net)
        yield eager, fused_net, kw, side
    finally:
        torch.set_num_threads(previous)


def rounding_equivalent(x: torch.Tensor, seed: int):
    """x and ROUNDING_DRAWS − 1 copies with every element moved one ulp up or down at
    random: inputs on which a float32 network makes the same computation with different
    rounding."""
    gen = torch.Generator().manual_seed(seed)
    up, down = torch.full_like(x, float("inf")), torch.full_like(x, float("-inf"))
    draws = [x]
    for _ in range(ROUNDING_DRAWS - 1):
        toward = torch.where(torch.rand(x.shape, generator=gen) < 0.5, up, down)
        draws.append(torch.nextafter(x, toward))
    return draws


def network_errors(name: str, order: str, norm: str, seed: int, threads: int, tamper=None):
    """(eager errors, fused errors): {key: (largest error over the rounding-equivalent
    inputs, scale)}, each input's float32 step against the float64 network on that input."""
    with networks(name, order, norm, seed, threads, tamper) as (eager, fused_net, kw, side):
        reference = models.build(name, backend="eager", **kw).double()
        reference.load_state_dict(eager.state_dict())
        x = torch.randn(BATCH, 3, side, side)
        grad_out = torch.randn(BATCH, 10)
        results = []
        for net in (eager, fused_net):
            worst = {}
            for xr in rounding_equivalent(x, seed):
                errors = errors_against_float64(copy.deepcopy(net), reference, xr, grad_out)
                for key, (err, scale) in errors.items():
                    worst[key] = (max(err, worst.get(key, (0.0,))[0]), scale)
            results.append(worst)
        return tuple(results)


def beyond_bound(eager: dict, fused_: dict, factor: float = 2.0) -> dict:
    """{key: (fused error, eager error, scale)} for every key beyond factor·eager +
    FLOOR·scale."""
    assert set(eager) == set(fused_)
    bad = {}
    for key in eager:
        scale = scale_of(key, eager)
        if not fused_[key][0] <= factor * eager[key][0] + FLOOR * scale:
            bad[key] = (fused_[key][0], eager[key][0], scale)
    return bad


def check(name, order, norm, seed, threads, factor=2.0):
    eager, fused_ = network_errors(name, order, norm, seed, threads)
    bad = beyond_bound(eager, fused_, factor)
    detail = "; ".join(f"{k}: fused {f:.2e}, eager {e:.2e}, scale {s:.2e}"
                       for k, (f, e, s) in sorted(bad.items(), key=lambda kv: -kv[1][0] /
                                                  (kv[1][2] or 1))[:5])
    assert not bad, (f"{name} {order} {norm} seed {seed}, {threads} threads: {len(bad)} of "
                     f"{len(eager)} tensors beyond {factor:g}x eager + {FLOOR:g}·scale: "
                     f"{detail}")


# bn-conv-relu's fold (fused/bn_conv_relu.py) sums x·(W·s) where eager sums W·norm(x), so
# its rounding grows with |mean|/std of the unit's input: on ReLU outputs (≈ 1.3) each unit
# rounds 1.3x as much as eager, and deep networks carry that into their norm-parameter
# gradients (ResNet-34, seed 0: 2.8x eager's error with the fold, 1.7x without; AlexNet,
# ResNet-101: 2.0-2.1x with it). The fold is kept: it spares a pass over every unit's input
# in both directions (ResNet-20, batch 64, channels_last: a training step 1.08x slower without
# it at width 1, 1.15x at width 0.5; VGG-16 at width 0.25: 1.03x).
# With batch statistics those networks are held to the 2x bound with the fold turned off,
# and to FOLD_ROUNDING times it with the fold on.
FOLD_ROUNDING = 2.0


def folds_with_batch_statistics(order: str, norm: str) -> bool:
    return order == "bn-conv-relu" and norm in ("bn", "bn-minus")


@contextlib.contextmanager
def fold_limit(limit: float):
    module = sys.modules["fused.bn_conv_relu"]
    previous = module.FOLD_MAX_MEAN_OVER_STD
    module.FOLD_MAX_MEAN_OVER_STD = limit
    try:
        yield
    finally:
        module.FOLD_MAX_MEAN_OVER_STD = previous


_SETTINGS = dict(max_examples=2, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("name, order, norm", list(cases()))
def test_network_within_twice_eager(name, order, norm):
    """Seeds and the thread count (1 or 2) drawn by hypothesis, derandomized: the same
    draws on every run of the suite."""
    @settings(**_SETTINGS)
    @given(seed=st.integers(0, 2**31 - 1), threads=st.sampled_from([1, 2]))
    def run(seed, threads):
        if folds_with_batch_statistics(order, norm):
            with fold_limit(0.0):  # every unit applies its norm explicitly
                check(name, order, norm, seed, threads)
            check(name, order, norm, seed, threads, 2.0 * FOLD_ROUNDING)
        else:
            check(name, order, norm, seed, threads)
    run()


def test_fold_limit_turns_the_fold_off():
    """The no-fold configuration above really takes the explicit-norm path (also in the
    C++ autograd node): the output changes in its last digits, not more."""
    with networks("resnet20", "bn-conv-relu", "bn", 0, 2) as (eager, fused_net, _, side):
        x = torch.randn(BATCH, 3, side, side)
        state = copy.deepcopy(fused_net.state_dict())
        folded = fused_net.train()(x)
        fused_net.load_state_dict(state)
        with fold_limit(0.0):
            explicit = fused_net(x)
        assert not torch.equal(folded, explicit)
        torch.testing.assert_close(folded, explicit, rtol=1e-4, atol=1e-4)


def test_three_threads_on_resnet20():
    """ATen's pool splits the C++ kernels' work differently at every thread count; 3 threads
    on 2 cores split each channel's reductions unevenly."""
    for order in ("conv-bn-relu", "conv-relu-bn"):
        check("resnet20", order, "bn", 7, 3)


def test_the_bound_catches_a_wrong_network():
    """The check is not vacuous: one unit deep inside the fused network normalizing with
    eps 1e-3 instead of 1e-5 moves the output and the gradients upstream beyond it."""
    def tamper(net):
        net.layer2[1].branch[0].norm.eps = 1e-3

    eager, fused_ = network_errors("resnet20", "conv-bn-relu", "bn", 0, 2)
    assert not beyond_bound(eager, fused_)
    eager, fused_ = network_errors("resnet20", "conv-bn-relu", "bn", 0, 2, tamper)
    bad = beyond_bound(eager, fused_)
    assert {"out", "dx", "d:stem.0.conv.weight", "d:layer2.1.branch.0.norm.weight"} <= set(bad)


def unit_errors(name: str, order: str, norm: str, seed: int, threads: int, tamper=None):
    """{unit: (eager errors, fused errors)}: every unit of the network, eager and fused, run
    alone on the input and output gradient that unit saw in the eager float32 network's
    training step, each against a float64 copy of the unit on its own branches."""
    with networks(name, order, norm, seed, threads, tamper) as (eager, fused_net, _, side):
        x = torch.randn(BATCH, 3, side, side)
        grad_out = torch.randn(BATCH, 10)
        result = {}
        for unit, (x_u, g_u) in unit_activations(eager, x, grad_out).items():
            e_unit, f_unit = eager.get_submodule(unit), fused_net.get_submodule(unit)
            reference = copy.deepcopy(e_unit).double()
            result[unit] = (errors_against_float64(e_unit, reference, x_u, g_u),
                            errors_against_float64(f_unit, reference, x_u, g_u))
        return result


def check_units(name, order, norm, seed, threads):
    failures = []
    for unit, (eager, fused_) in unit_errors(name, order, norm, seed, threads).items():
        for key, (f, e, s) in beyond_bound(eager, fused_).items():
            failures.append(f"{unit} {key}: fused {f:.2e}, eager {e:.2e}, scale {s:.2e}")
    assert not failures, (f"{name} {order} {norm} seed {seed}, {threads} threads: "
                          + "; ".join(failures[:6]))


@pytest.mark.parametrize("name, order, norm", list(cases()))
def test_every_unit_within_twice_eager_on_network_activations(name, order, norm):
    """Each unit on the activations and gradients it meets inside the network. Unlike the
    whole-network test, both implementations see bit-identical inputs, so how much the
    network amplifies its input's rounding (see the module docstring) does not enter."""
    @settings(**_SETTINGS)
    @given(seed=st.integers(0, 2**31 - 1), threads=st.sampled_from([1, 2]))
    def run(seed, threads):
        check_units(name, order, norm, seed, threads)
    run()


def test_the_unit_bound_catches_a_wrong_unit():
    def tamper(net):
        net.layer2[1].branch[0].norm.eps = 1e-3

    errors = unit_errors("resnet20", "conv-bn-relu", "bn", 0, 2, tamper)
    bad = {unit for unit, (eager, fused_) in errors.items() if beyond_bound(eager, fused_)}
    assert bad == {"layer2.1.branch.0"}
