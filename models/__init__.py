"""The networks of the study, every one built from the one unit factory `fused.make_unit`.

    models.build(name, order="conv-bn-relu", norm="bn", backend="eager"|"fused",
                 in_channels=3, num_classes=10, **options)
    models.NAMES                        the network names build accepts
    models.input_size(name, **options)  the native input side (32 CIFAR-style, 224 ImageNet)
    models.summary_rows(...)            parameters and MACs per image, network × norm
    models.format_table(rows)           those rows as a text table

Options every network takes: `bias` (conv bias in the units; default: the original network's
choice, True for cnn/alexnet/vgg16, False for the ResNets), `input_norm` (bn-conv-relu only:
False empties the norm slot of the first unit, which would see the raw image), and the unit
options `momentum`, `eps`, `track_running_stats`. Network options: cnn/alexnet/vgg16
`input_size` (default 32; fixes the fc width) and `dropout` (default 0); cnn `hidden`
(default 128); resnet18/34/50/101 `stem` ("imagenet" default, or "cifar"). Every network
takes `width` (default 1.0): a channel multiplier on every conv and hidden fc width
(rounded, at least 1), with depth, pools and unit placement unchanged, so parameter and
module names (and state_dict keys) are those of width 1.0, only the shapes differ.
Placement rules: each module's docstring (models.cnn, .alexnet, .vgg, .resnet).
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple

from torch import nn

from . import alexnet as _alexnet, cnn as _cnn, resnet as _resnet, vgg as _vgg
from ._blocks import Units, check_width, init_weights, units_of


class _Network(NamedTuple):
    build: Callable[..., nn.Module]
    bias: bool           # the original network's conv bias
    plain: bool          # cnn/alexnet/vgg16: a fixed input_size sets the fc width


_NETWORKS: Dict[str, _Network] = {
    "cnn": _Network(_cnn.cnn, True, True),
    "alexnet": _Network(_alexnet.alexnet, True, True),
    "vgg16": _Network(_vgg.vgg16, True, True),
    "resnet20": _Network(_resnet.resnet20, False, False),
    "resnet18": _Network(_resnet.resnet18, False, False),
    "resnet34": _Network(_resnet.resnet34, False, False),
    "resnet50": _Network(_resnet.resnet50, False, False),
    "resnet101": _Network(_resnet.resnet101, False, False),
}
NAMES = tuple(_NETWORKS)
_UNIT_OPTIONS = ("momentum", "eps", "track_running_stats")


def _network(name: str) -> _Network:
    if name not in _NETWORKS:
        raise ValueError(f"unknown network {name!r}; expected one of {NAMES}")
    return _NETWORKS[name]


def build(name: str, order: str = "conv-bn-relu", norm: str = "bn", backend: str = "eager",
          in_channels: int = 3, num_classes: int = 10, *, bias: bool | None = None,
          input_norm: bool = True, **options) -> nn.Module:
    """Network `name` with every unit in `order`, holding `norm`, computed by `backend`.

    Eager and fused networks of one configuration have identical state_dicts (and, for one
    seed, identical initial parameters)."""
    network = _network(name)
    unit_options = {k: options.pop(k) for k in _UNIT_OPTIONS if k in options}
    units = Units(order, norm, backend, bias=network.bias if bias is None else bias,
                  input_norm=input_norm, **unit_options)
    try:
        model = network.build(units, in_channels=in_channels, num_classes=num_classes,
                              **options)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise TypeError(f"{name}: {e}; see models.__doc__ for the options") from None
        raise
    return init_weights(model)


def input_size(name: str, **options) -> int:
    """The side of the square input `build(name, **options)` is made for: `input_size` for
    the plain networks (32 by default), 32 for resnet20 and for `stem="cifar"`, else 224."""
    network = _network(name)
    if network.plain:
        return options.get("input_size", 32)
    if name == "resnet20" or options.get("stem", "imagenet") == "cifar":
        return 32
    return 224


from .summary import count_macs, count_params, format_table, summary_rows  # noqa: E402

__all__ = ["NAMES", "build", "check_width", "input_size", "summary_rows", "format_table", "count_params",
           "count_macs", "units_of"]
