"""Whole networks against a float64 copy that takes the same branches.

A network with ReLUs and max pools is piecewise smooth: its gradient jumps where a ReLU input
crosses 0 or two values of a pooling window swap places. Float32 rounding decides the side of
every value that lies within rounding of such a kink, and a network of a few hundred thousand
activations has some: in ResNet-20 at batch 4, float64 ReLU inputs within 1e-6 of 0 turn up
in about a quarter of random draws. Eager float32 and the fused kernels round differently,
so each lands on its own side of those values, and the side taken flips the gradient of that
element by O(1), which the backward pass carries to the input and to every weight upstream
(ResNet-20, conv-relu-bn, seed 1: eager float32's input gradient is 2.6e-3 off the plain
float64 one; the fused one, which rounds that value to the other side, is 1.3e-7 off).

So each float32 run is compared with the float64 network evaluated on the float32 run's own
branches: every ReLU keeps the mask the float32 forward computed, every max pool the indices
it chose. What remains is rounding, which the 2x-eager bound of DESIGN §6 is about. The
branch decisions are recorded in call order:

- eager modules: every `F.relu` and `F.max_pool2d` call;
- fused units: one mask per unit with a ReLU, taken from the unit's output (ReLU after the
  norm: out > 0) or from its convolution output recomputed with the same ATen call (ReLU
  before the norm: y > 0); calls made inside a fused unit are not recorded.

The float64 copy replays them: `F.relu(x)` becomes x·mask, `F.max_pool2d` a gather at the
recorded indices (both differentiable, with the recorded branch's gradient).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fused.modules import FusedUnit, Unit

_relu = F.relu
_max_pool2d = F.max_pool2d


@contextlib.contextmanager
def _patched(relu: Callable, max_pool2d: Callable):
    F.relu, F.max_pool2d = relu, max_pool2d
    try:
        yield
    finally:
        F.relu, F.max_pool2d = _relu, _max_pool2d


def _pool_with_indices(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                       return_indices=False):
    return F.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode,
                                     True)


def _unit_mask(unit: FusedUnit, x: Tensor, out: Tensor) -> Tensor:
    if unit.order == "conv-relu-bn":
        conv = unit.conv
        y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                     conv.groups)
        return y > 0
    return out > 0


def record_branches(model: nn.Module, x: Tensor) -> List[Tensor]:
    """Runs model(x) and returns its ReLU masks and max-pool indices in call order."""
    decisions: List[Tensor] = []
    inside_unit = [0]

    def relu(t, inplace=False):
        if not inside_unit[0]:
            decisions.append(t.detach() > 0)
        return _relu(t, inplace=inplace)

    def max_pool2d(t, *args, return_indices=False, **kwargs):
        out, idx = _pool_with_indices(t, *args, **kwargs)
        if not inside_unit[0]:
            decisions.append(idx)
        return (out, idx) if return_indices else out

    def enter(module, args):
        inside_unit[0] += 1

    def leave(module, args, out):
        inside_unit[0] -= 1
        if module.relu:
            decisions.append(_unit_mask(module, args[0].detach(), out.detach()))

    handles = []
    for m in model.modules():
        if isinstance(m, FusedUnit):
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    try:
        with _patched(relu, max_pool2d), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return decisions


def replay_branches(model: nn.Module, x: Tensor, decisions: List[Tensor]) -> Tensor:
    """model(x) (an eager network) with every ReLU and max pool taking the recorded branch."""
    queue = list(decisions)

    def take(shape) -> Tensor:
        if not queue:
            raise AssertionError("the replayed network makes more ReLU/pool calls than the "
                                 "recorded one")
        d = queue.pop(0)
        if d.shape != shape:
            raise AssertionError(f"recorded branch of shape {tuple(d.shape)} where the "
                                 f"replay has {tuple(shape)}")
        return d

    def relu(t, inplace=False):
        return t * take(t.shape).to(t.dtype)

    def max_pool2d(t, *args, return_indices=False, **kwargs):
        shape = _pool_with_indices(t.detach(), *args, **kwargs)[1].shape
        idx = take(shape)
        out = t.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)
        return (out, idx) if return_indices else out

    with _patched(relu, max_pool2d):
        out = model(x)
    if queue:
        raise AssertionError(f"{len(queue)} recorded branches were not replayed")
    return out


def step_results(model: nn.Module, x: Tensor, grad_out: Tensor,
                 forward: Callable[[nn.Module, Tensor], Tensor] | None = None
                 ) -> Dict[str, Tensor]:
    """One training-mode forward and backward: the output, the input gradient, every
    parameter gradient and every floating-point buffer (running statistics) after it."""
    model.train()
    x = x.detach().clone().requires_grad_(True)
    out = forward(model, x) if forward else model(x)
    out.backward(grad_out.to(out.dtype))
    result = {"out": out.detach(), "dx": x.grad}
    result.update({f"d:{name}": p.grad for name, p in model.named_parameters()})
    result.update({f"buffer:{name}": b for name, b in model.named_buffers()
                   if b.is_floating_point()})
    return result


def errors_against_float64(model32: nn.Module, reference: nn.Module, x: Tensor,
                           grad_out: Tensor) -> Dict[str, tuple]:
    """{key: (max |float32 − float64 on the same branches|, max |float64|)} for one step of
    model32 (float32) against `reference`, a float64 eager network with the same state, left
    untouched (a copy runs)."""
    start = copy.deepcopy(model32.state_dict())
    decisions = record_branches(model32.train(), x)
    model32.load_state_dict(start)  # the recording forward moved the running statistics
    got = step_results(model32, x, grad_out)
    ref64 = copy.deepcopy(reference)
    want = step_results(ref64, x.double(), grad_out.double(),
                        lambda m, xx: replay_branches(m, xx, decisions))
    assert set(got) == set(want), set(got) ^ set(want)
    result = {}
    for key, w in want.items():
        assert got[key] is not None and w is not None, f"{key}: no gradient"
        result[key] = ((got[key].double() - w).abs().max().item(), w.abs().max().item())
    return result


def unit_activations(model: nn.Module, x: Tensor, grad_out: Tensor
                     ) -> Dict[str, Tuple[Tensor, Tensor]]:
    """{unit name: (its input, the gradient at its output)} from one training step of
    `model`, whose state is left as it was: the activations a network's units really see."""
    start = copy.deepcopy(model.state_dict())
    seen: Dict[str, List[Tensor]] = {}

    def hook(name):
        def record(module, args, out):
            seen[name] = [args[0].detach().clone()]
            out.register_hook(lambda g: seen[name].append(g.detach().clone()))
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()
               if isinstance(m, (Unit, FusedUnit))]
    try:
        step_results(model, x, grad_out)
    finally:
        for h in handles:
            h.remove()
        model.load_state_dict(start)
    missing = [name for name, got in seen.items() if len(got) != 2]
    assert not missing, f"no output gradient reached {missing}"
    return {name: (got[0], got[1]) for name, got in seen.items()}
