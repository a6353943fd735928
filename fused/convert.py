"""`fused.convert(model)`: rewrite an eager model's conv/norm/ReLU sequences into fused units.

What is converted, searching the whole module tree:

- every eager `fused.Unit` (what `models.build(..., backend="eager")` is made of) becomes a
  `fused.FusedUnit` of the same order, holding the very same `conv` and `norm` modules, so
  its state_dict keys, parameters (and any optimizer state on them) are unchanged;
- inside every `nn.Sequential`, runs of consecutive children

      Conv2d, Norm, ReLU    → conv-bn-relu          Conv2d, Norm → conv-bn-relu, relu=False
      Conv2d, ReLU, Norm    → conv-relu-bn          (e.g. a ResNet projection shortcut)
      Norm, Conv2d, ReLU    → bn-conv-relu

  with Norm an nn.BatchNorm2d (affine or not) or `fused.Affine2d`, matched left to right.
  The fused unit takes the conv's place and nn.Identity the others', so the indices of the
  other children do not move; the converted layers' state_dict keys become
  `<conv index>.conv.*` and `<conv index>.norm.*`.

Left untouched: a conv with padding_mode other than "zeros" or string padding ("same"),
transposed or 1-D/3-D convs, norms whose channel count does not match the conv side they
would normalize, subclasses of these modules (their forward may differ), a Conv→ReLU pair
without a norm (nothing to fuse), and layers used by a custom forward (only nn.Sequential
fixes the data flow). BatchNorm settings (eps, momentum including None,
track_running_stats, affine) carry over as they are.
"""
from __future__ import annotations

import copy
import logging
from typing import List, NamedTuple, Optional, Tuple

from torch import nn

from .modules import Affine2d, FusedUnit, Unit, norm_name

log = logging.getLogger(__name__)


class Converted(NamedTuple):
    path: str        # dotted name of the fused unit in the model
    order: str
    norm: str


class Conversion(list):
    """The list of what was converted; `.model` is the converted model (the argument itself
    when inplace=True, else a converted deep copy)."""

    def __init__(self, model: nn.Module, entries=()):
        super().__init__(entries)
        self.model = model


def _fusable_conv(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


def _is_norm(m: nn.Module) -> bool:
    return type(m) in (nn.BatchNorm2d, Affine2d)


def _is_relu(m: nn.Module) -> bool:
    return type(m) is nn.ReLU


def _fused_unit(order: str, conv: nn.Conv2d, norm: Optional[nn.Module],
                relu: bool) -> FusedUnit:
    """A FusedUnit around existing modules (no fresh parameters are allocated)."""
    unit = FusedUnit.__new__(FusedUnit)
    nn.Module.__init__(unit)
    unit.order, unit.conv, unit.norm, unit.relu = order, conv, norm, relu
    unit.train(conv.training)
    return unit


def _match(children: List[nn.Module], i: int) -> Optional[Tuple[str, int, int, int, bool]]:
    """(order, length, offsets of the conv and the norm, relu) of a fusable run starting at
    i, or None."""
    run = children[i:i + 3] + [nn.Module()] * (3 - len(children[i:i + 3]))
    a, b, c = run
    if _fusable_conv(a):
        if _is_norm(b) and b.num_features == a.out_channels:
            return "conv-bn-relu", 3 if _is_relu(c) else 2, 0, 1, _is_relu(c)
        if _is_relu(b) and _is_norm(c) and c.num_features == a.out_channels:
            return "conv-relu-bn", 3, 0, 2, True
    elif (_is_norm(a) and _fusable_conv(b) and _is_relu(c)
          and a.num_features == b.in_channels):
        return "bn-conv-relu", 3, 1, 0, True
    return None


def _convert_sequential(seq: nn.Sequential, prefix: str, out: List[Converted]) -> None:
    names = list(seq._modules)
    children = [seq._modules[n] for n in names]
    i = 0
    while i < len(children):
        found = _match(children, i)
        if found is None:
            i += 1
            continue
        order, length, at, norm_at, relu = found
        conv, norm = children[i + at], children[i + norm_at]
        for k in range(i, i + length):
            seq._modules[names[k]] = nn.Identity()
        seq._modules[names[i + at]] = _fused_unit(order, conv, norm, relu)
        out.append(Converted(prefix + names[i + at], order, norm_name(norm)))
        i += length


def _convert(module: nn.Module, prefix: str, out: List[Converted]) -> None:
    if isinstance(module, nn.Sequential):
        _convert_sequential(module, prefix, out)
    for name, child in list(module._modules.items()):
        if child is None or isinstance(child, FusedUnit):
            continue
        if type(child) is Unit and _fusable_conv(child.conv):
            module._modules[name] = _fused_unit(child.order, child.conv, child.norm,
                                                child.relu)
            out.append(Converted(prefix + name, child.order, child.norm_kind))
        else:
            _convert(child, prefix + name + ".", out)


def convert(model: nn.Module, inplace: bool = True) -> Conversion:
    """Replace the fusable conv/norm/ReLU sequences of `model` by fused units (see the
    module docstring for what counts as fusable), keeping parameters, running statistics
    and train/eval mode. Returns the list of (path, order, norm) converted, with the model
    as `.model`; each conversion is also logged at INFO level on "fused.convert"."""
    if not inplace:
        model = copy.deepcopy(model)
    if type(model) is Unit:
        raise TypeError("convert rewrites a unit inside a model; for a lone Unit build "
                        "fused.make_unit(..., backend='fused') and load its state_dict")
    result = Conversion(model)
    _convert(model, "", result)
    for entry in result:
        log.info("converted %s: %s, norm %s", entry.path or "<model>", entry.order,
                 entry.norm)
    return result
