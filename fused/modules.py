"""Units as nn.Modules: the eager reference `Unit` and the fused `ConvBNReLU2d`,
`ConvReLUBN2d`, `BNConvReLU2d`.

Every unit has the children `conv` (an nn.Conv2d) and `norm` (nn.BatchNorm2d for bn and
bn-minus, `Affine2d` for affine, None for none), so eager and fused units of one
configuration have identical state_dicts and a checkpoint moves freely between them and
plain PyTorch modules.

    order          norm sees               channels of the norm
    conv-bn-relu   conv output             out_channels
    conv-relu-bn   relu(conv output)       out_channels
    bn-conv-relu   the unit's input        in_channels
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _unit
# Importing the orders registers their fused forward in _unit.FORWARDS.
from .bn_conv_relu import bn_conv_relu  # noqa: F401
from .conv_bn_relu import conv_bn_relu  # noqa: F401
from .conv_relu_bn import conv_relu_bn  # noqa: F401
from .reference import NORMS, ORDERS, norm_forward


class Affine2d(nn.Module):
    """AffineLayer: a per-channel scale and shift with no statistics (norm "affine")."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}"


def make_norm(norm: str, channels: int, momentum: Optional[float] = 0.1, eps: float = 1e-5,
              track_running_stats: bool = True) -> Optional[nn.Module]:
    """The module that fills the norm slot."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
    if norm == "none":
        return None
    if norm == "affine":
        return Affine2d(channels)
    return nn.BatchNorm2d(channels, eps=eps, momentum=momentum, affine=(norm == "bn"),
                          track_running_stats=track_running_stats)


def norm_name(module: Optional[nn.Module]) -> str:
    """Inverse of make_norm."""
    if module is None:
        return "none"
    if isinstance(module, Affine2d):
        return "affine"
    if isinstance(module, nn.BatchNorm2d):
        return "bn" if module.affine else "bn-minus"
    raise TypeError(f"not a norm module: {type(module).__name__}")


class _UnitBase(nn.Module):
    order: str

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = False, norm: str = "bn",
                 momentum: Optional[float] = 0.1, eps: float = 1e-5,
                 track_running_stats: bool = True, relu: bool = True):
        super().__init__()
        if self.order not in ORDERS:
            raise ValueError(f"unknown order {self.order!r}; expected one of {ORDERS}")
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                              dilation, groups, bias)
        norm_channels = in_channels if self.order == "bn-conv-relu" else out_channels
        self.norm = make_norm(norm, norm_channels, momentum, eps, track_running_stats)
        self.relu = relu

    @property
    def norm_kind(self) -> str:
        return norm_name(self.norm)

    def _batchnorm_factor(self, norm: nn.BatchNorm2d) -> float:
        """nn.BatchNorm2d.forward's momentum logic, including momentum=None (a cumulative
        average over num_batches_tracked)."""
        factor = 0.0 if norm.momentum is None else norm.momentum
        if self.training and norm.track_running_stats and norm.num_batches_tracked is not None:
            norm.num_batches_tracked.add_(1)
            factor = (1.0 / float(norm.num_batches_tracked) if norm.momentum is None
                      else norm.momentum)
        return factor

    def _norm_args(self):
        """(norm kind, running_mean, running_var, norm_weight, norm_bias, eps, momentum) for
        the functional, as nn.BatchNorm2d.forward chooses them."""
        norm = self.norm
        if isinstance(norm, nn.BatchNorm2d):
            use_running = not self.training or norm.track_running_stats
            running = (norm.running_mean, norm.running_var) if use_running else (None, None)
            return ("bn" if norm.affine else "bn-minus", *running, norm.weight, norm.bias,
                    norm.eps, self._batchnorm_factor(norm))
        if isinstance(norm, Affine2d):
            return "affine", None, None, norm.weight, norm.bias, 1e-5, 0.0
        return norm_name(norm), None, None, None, None, 1e-5, 0.0

    def extra_repr(self) -> str:
        return f"order={self.order!r}, norm={self.norm_kind!r}, relu={self.relu}"


class Unit(_UnitBase):
    """The eager reference unit: nn.Conv2d, the norm module and F.relu, in `order`."""

    def __init__(self, order: str, *args, **kwargs):
        self.order = order
        super().__init__(*args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu if self.relu else (lambda t: t)
        norm = self.norm if self.norm is not None else (lambda t: t)
        if self.order == "conv-bn-relu":
            return act(norm(self.conv(x)))
        if self.order == "conv-relu-bn":
            return norm(act(self.conv(x)))
        return act(self.conv(norm(x)))


class FusedUnit(_UnitBase):
    """A unit computed by this package's fused ops (C++ on CPU, Triton on CUDA)."""

    sync_key = -1  # a fused.sync key: training statistics over a process group (convert_sync_bn)

    def __init__(self, order: str, *args, **kwargs):
        self.order = order
        super().__init__(*args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        conv = self.conv
        if conv.padding_mode != "zeros":
            raise ValueError(f"fused units support padding_mode='zeros' only, got "
                             f"{conv.padding_mode!r}")
        norm, running_mean, running_var, norm_weight, norm_bias, eps, momentum = \
            self._norm_args()
        training = self.training
        # _unit.run itself rather than the public functional (fused.conv_bn_relu, ...): the
        # same code, one Python call and its keyword handling fewer per unit and step.
        return _unit.run(*_unit.FORWARDS[self.order], x, conv.weight, conv.bias, conv.stride,
                         conv.padding, conv.dilation, conv.groups, running_mean, running_var,
                         norm_weight, norm_bias, training, momentum, eps, norm, self.relu,
                         self.sync_key if training else -1)


class ConvBNReLU2d(FusedUnit):
    """Fused relu(norm(conv(x)))."""

    def __init__(self, *args, **kwargs):
        super().__init__("conv-bn-relu", *args, **kwargs)


class ConvReLUBN2d(FusedUnit):
    """Fused norm(relu(conv(x)))."""

    def __init__(self, *args, **kwargs):
        super().__init__("conv-relu-bn", *args, **kwargs)


class BNConvReLU2d(FusedUnit):
    """Fused relu(conv(norm(x))), the norm over the input channels."""

    def __init__(self, *args, **kwargs):
        super().__init__("bn-conv-relu", *args, **kwargs)


BACKENDS = ("eager", "fused")


def make_unit(order: str, in_channels: int, out_channels: int, kernel_size, stride=1,
              padding=0, *, backend: str = "eager", **kwargs) -> _UnitBase:
    """The unit factory every network is built from.

    `backend` is "eager" (nn modules, the reference) or "fused"; the remaining keyword
    arguments are those of ConvBNReLU2d (dilation, groups, bias, norm, momentum, eps,
    track_running_stats, relu)."""
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; expected one of {ORDERS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    cls = Unit if backend == "eager" else FusedUnit
    return cls(order, in_channels, out_channels, kernel_size, stride, padding, **kwargs)


# Keep the names used by the reference importable from here too.
__all__ = ["Affine2d", "Unit", "FusedUnit", "ConvBNReLU2d", "ConvReLUBN2d", "BNConvReLU2d",
           "make_unit", "make_norm", "norm_name", "norm_forward"]
