"""The small CNN of the placement question: conv-relu-pool, conv-relu-pool, fc, fc.

Each conv and the hidden fc are units; the max pools sit between units, as in the original;
the last fc is the plain Linear classifier. What the three orders make of it (N = norm):

    conv-bn-relu   [conv3x3 32 → N → relu] → pool → [conv3x3 64 → N → relu] → pool → [fc 128 → N → relu] → fc
    conv-relu-bn   [conv3x3 32 → relu → N] → pool → [conv3x3 64 → relu → N] → pool → [fc 128 → relu → N] → fc
    bn-conv-relu   [N → conv3x3 32 → relu] → pool → [N → conv3x3 64 → relu] → pool → [N → fc 128 → relu] → fc
                    ^ the raw image            ^ sees the pooled tensor

With bn-conv-relu the norm sees the pooled tensor, which is what makes it differ from
conv-relu-bn. Convolutions are 3×3 with padding 1, pools 2×2; the fc width is
64·(input_size/4)² (input_size 32 → 4096, Fashion-MNIST's 28 → 3136).
"""
from __future__ import annotations

from ._blocks import PlainNet, Units

LAYERS = (("unit", 32, 3, 1, 1), ("pool", 2, 2), ("unit", 64, 3, 1, 1), ("pool", 2, 2))


def cnn(units: Units, *, in_channels: int, num_classes: int, input_size: int = 32,
        hidden: int = 128, dropout: float = 0.0, width: float = 1.0) -> PlainNet:
    return PlainNet(units, LAYERS, (hidden,), in_channels=in_channels,
                    num_classes=num_classes, input_size=input_size, dropout=dropout,
                    name="cnn", width=width)
