"""What every network shares: the bound unit factory, the plain (unit-sequence) network, and
the weight initialization.

Every unit of every network comes from `Units.__call__`, which calls `fused.make_unit`; the
networks only decide where units, pools and the classifier go. No network has per-order code:
the order changes what a unit computes, and in a ResNet whether the ReLU follows the addition
(`Units.relu_after_add`).

Choices that hold for all networks:

- The final classifier is a plain `nn.Linear` (with bias): none of the original networks has
  a norm or ReLU after it, so it is not a unit. Hidden fully connected layers are units, 1×1
  convolutions on an N×C×1×1 view of the features (`To1x1`).
- bn-conv-relu puts a norm on the first unit's input, i.e. on the raw image: a learned
  per-channel standardization of the input (3 channels, negligible cost). That is the
  default, so every unit of a network is alike; `input_norm=False` builds the first unit with
  an empty norm slot instead (only bn-conv-relu has a norm there to remove).
- norm "none" empties the slot and keeps everything else, including the order's block
  structure in a ResNet, so the BN tax of an order is measured on the same topology.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

import fused
from fused.modules import _UnitBase


class Units:
    """`fused.make_unit` with the network-wide settings (order, norm, backend, conv bias and
    the norm's momentum/eps/track_running_stats) bound."""

    def __init__(self, order: str, norm: str, backend: str, *, bias: bool,
                 input_norm: bool = True, **unit_options):
        if order not in fused.ORDERS:
            raise ValueError(f"unknown order {order!r}; expected one of {fused.ORDERS}")
        if norm not in fused.NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected one of {fused.NORMS}")
        allowed = {"momentum", "eps", "track_running_stats"}
        unknown = set(unit_options) - allowed
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)}; unit options are "
                            f"{sorted(allowed)}")
        self.order, self.norm, self.backend = order, norm, backend
        self.bias, self.input_norm = bias, input_norm
        self.unit_options = unit_options

    @property
    def relu_after_add(self) -> bool:
        """ResNet rule: where the order ends with ReLU, the branch's last unit drops it and
        the ReLU follows the addition; conv-relu-bn's branch ends with the norm."""
        return self.order != "conv-relu-bn"

    def __call__(self, in_channels: int, out_channels: int, kernel_size: int = 1,
                 stride: int = 1, padding: int = 0, *, relu: bool = True,
                 first: bool = False) -> nn.Module:
        norm = self.norm
        if first and not self.input_norm and self.order == "bn-conv-relu":
            norm = "none"
        return fused.make_unit(self.order, in_channels, out_channels, kernel_size, stride,
                               padding, backend=self.backend, norm=norm, bias=self.bias,
                               relu=relu, **self.unit_options)


class To1x1(nn.Module):
    """N×C×H×W (or N×F) → N×(C·H·W)×1×1: a fully connected layer becomes a 1×1 conv unit."""

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1, 1, 1)


def pooled_size(size: int, kernel: int, stride: int, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def check_width(width) -> float:
    """The channel multiplier `width`, or ValueError saying why it is not one."""
    try:
        w = float(width)
    except (TypeError, ValueError):
        raise ValueError(f"width must be a number, got {width!r}") from None
    if not (w > 0 and w < float("inf")):
        raise ValueError(f"width must be a positive finite number, got {width!r}")
    return w


def scaled(channels: int, width: float) -> int:
    """`channels` × `width`, rounded, at least 1: every conv and hidden fc width of a network
    goes through here, so one multiplier thins or widens the whole network while its depth,
    pools and placement of units stay as they are."""
    return max(1, round(channels * width))


class PlainNet(nn.Module):
    """A sequence of units and pools (`features`), then hidden FC units and a Linear
    (`classifier`). Built from a layer list:

        ("unit", out_channels, kernel, stride, padding)   ("pool", kernel, stride)
        and the hidden FC widths; dropout (if > 0) precedes each hidden FC unit, as in the
        original AlexNet and VGG classifiers. `width` multiplies every out_channels and
        hidden FC width (`scaled`).
    """

    def __init__(self, units: Units, layers: Sequence[tuple], hidden: Sequence[int], *,
                 in_channels: int, num_classes: int, input_size: int, dropout: float,
                 name: str, width: float = 1.0):
        super().__init__()
        width = check_width(width)
        features, channels, size = [], in_channels, input_size
        for layer in layers:
            if layer[0] == "unit":
                _, out, k, s, p = layer
                out = scaled(out, width)
                features.append(units(channels, out, k, s, p, first=not features))
                channels, size = out, pooled_size(size, k, s, p)
            else:
                _, k, s = layer
                features.append(nn.MaxPool2d(k, s))
                size = pooled_size(size, k, s)
            if size < 1:
                raise ValueError(f"{name}: input_size={input_size} is too small, the feature "
                                 f"map vanishes after layer {len(features)} ({layer}); use "
                                 f"at least 32 (e.g. pad 28×28 images to 32×32)")
        self.features = nn.Sequential(*features)
        classifier, features_out = [To1x1()], channels * size * size
        for out in [scaled(h, width) for h in hidden]:
            if dropout > 0:
                classifier.append(nn.Dropout(dropout))
            classifier.append(units(features_out, out))
            features_out = out
        classifier += [nn.Flatten(), nn.Linear(features_out, num_classes)]
        self.classifier = nn.Sequential(*classifier)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def init_weights(model: nn.Module) -> nn.Module:
    """He et al. 2015 initialization for every conv (fan_out, ReLU gain), zero conv biases,
    norms at identity; Linear layers keep PyTorch's default. The same for every norm, so that
    norm "none" (deep networks without BN) starts from a trainable point too."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, fused.Affine2d)) and getattr(m, "weight", None) \
                is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def units_of(model: nn.Module):
    """(path, unit) for every unit of a network, eager or fused."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _UnitBase)]


__all__ = ["Units", "To1x1", "PlainNet", "init_weights", "units_of", "pooled_size",
           "check_width", "scaled"]
