"""AlexNet in its usual CIFAR-sized form (32×32 input): five conv units with 3×3 kernels
(the first with stride 2), three 2×2 max pools, two hidden fc units of 4096 and the Linear
classifier; about 23.3 M parameters with 10 classes.

    features:   U(64, s2) → pool → U(192) → pool → U(384) → U(256) → U(256) → pool
    classifier: [dropout] → U(fc 4096) → [dropout] → U(fc 4096) → Linear(classes)

    one unit U, by order (N = norm):
        conv-bn-relu   conv → N → relu
        conv-relu-bn   conv → relu → N
        bn-conv-relu   N → conv → relu      (N sees the pooled tensor after each pool,
                                             and the raw image in the first unit)

The fc units are 1×1 convolutions over the 256·2·2 = 1024 flattened features viewed as
N×1024×1×1. Dropout (0.5 in the original) is off by default so that the study varies the
normalization only; `dropout=0.5` restores it.
"""
from __future__ import annotations

from ._blocks import PlainNet, Units

LAYERS = (("unit", 64, 3, 2, 1), ("pool", 2, 2),
          ("unit", 192, 3, 1, 1), ("pool", 2, 2),
          ("unit", 384, 3, 1, 1), ("unit", 256, 3, 1, 1), ("unit", 256, 3, 1, 1),
          ("pool", 2, 2))


def alexnet(units: Units, *, in_channels: int, num_classes: int, input_size: int = 32,
            dropout: float = 0.0, width: float = 1.0) -> PlainNet:
    return PlainNet(units, LAYERS, (4096, 4096), in_channels=in_channels,
                    num_classes=num_classes, input_size=input_size, dropout=dropout,
                    name="alexnet", width=width)
