"""VGG-16 for CIFAR (32×32 input): the 13 conv units of configuration D (3×3, padding 1)
with five 2×2 max pools, then the CIFAR classifier: two hidden fc units of 512 and the
Linear classifier, 16 weight layers in all.

    64 64 pool 128 128 pool 256 256 256 pool 512 512 512 pool 512 512 512 pool
    → [dropout] → U(fc 512) → [dropout] → U(fc 512) → Linear(classes)

    each number is a unit U; by order (N = norm):
        conv-bn-relu   conv → N → relu
        conv-relu-bn   conv → relu → N
        bn-conv-relu   N → conv → relu      (the first unit after a pool normalizes the
                                             pooled tensor; the first of all, the image)

Five pools need at least 32×32 input. Dropout is off by default (`dropout=0.5` restores
the original classifier).
"""
from __future__ import annotations

from ._blocks import PlainNet, Units

CONFIG_D = (64, 64, "pool", 128, 128, "pool", 256, 256, 256, "pool",
            512, 512, 512, "pool", 512, 512, 512, "pool")
LAYERS = tuple(("pool", 2, 2) if c == "pool" else ("unit", c, 3, 1, 1) for c in CONFIG_D)


def vgg16(units: Units, *, in_channels: int, num_classes: int, input_size: int = 32,
          dropout: float = 0.0, width: float = 1.0) -> PlainNet:
    return PlainNet(units, LAYERS, (512, 512), in_channels=in_channels,
                    num_classes=num_classes, input_size=input_size, dropout=dropout,
                    name="vgg16", width=width)
