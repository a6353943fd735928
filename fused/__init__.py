"""bnorder's fused batch-norm units: every BN placement equally well fused.

    fused.conv_bn_relu / conv_relu_bn / bn_conv_relu     functional ops
    fused.ConvBNReLU2d / ConvReLUBN2d / BNConvReLU2d      modules (children conv, norm)
    fused.Unit(order, ...)                                the eager reference unit
    fused.make_unit(order, ..., backend="eager"|"fused")  the unit factory of models/
    fused.backend()                                       which implementation runs here
"""
from __future__ import annotations

import torch

from . import _backend, _ext
from ._conv import memory_format_of
from .bn_conv_relu import bn_conv_relu
from .conv_bn_relu import conv_bn_relu
from .conv_relu_bn import conv_relu_bn
from .convert import convert
from .modules import (Affine2d, BNConvReLU2d, ConvBNReLU2d, ConvReLUBN2d, FusedUnit, Unit,
                      make_norm, make_unit, norm_name)
from .reference import NORMS, ORDERS
from .sync import SyncBatchNorm2d, convert_sync_bn  # noqa: F401  (data-parallel training)

__version__ = "0.1.0"

_ext.warn_if_missing()
if _ext.loaded:
    from . import _cpp  # noqa: F401  (fake implementations of the C++ ops, for compile/opcheck)


def backend(device: torch.device | str = "cpu") -> str:
    """The primitive implementation fused ops use for tensors on `device`:
    "cpp", "triton" or "reference" (FUSED_BACKEND overrides the automatic choice)."""
    return _backend.name_for(device)


def extension_error() -> str | None:
    """Why the C++ extension failed to load, or None when it is loaded."""
    return _ext.error()


__all__ = ["conv_bn_relu", "conv_relu_bn", "bn_conv_relu", "ConvBNReLU2d", "ConvReLUBN2d",
           "BNConvReLU2d", "FusedUnit", "Unit", "Affine2d", "make_unit", "make_norm",
           "norm_name", "backend", "extension_error", "memory_format_of", "ORDERS", "NORMS"]
