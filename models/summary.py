"""Parameters and multiply-accumulates per image for every network × norm."""
from __future__ import annotations

import copy

from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

import fused
from fused import FusedUnit


def count_params(model: nn.Module) -> int:
    """Learnable parameters (running statistics are buffers and are not counted)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, size: int, in_channels: int = 3) -> int:
    """Multiply-accumulates of the convolutions and Linear layers for one size×size image,
    counted with forward hooks on a meta-device copy (no memory, no arithmetic; `model` is
    left as it is). Eager or fused: a fused unit calls its op without conv.forward, so it is
    hooked as a whole (its output has its conv's shape). Norms, ReLUs, pools and additions
    are not counted."""
    macs = []

    def conv_hook(m: nn.Module, inputs, out):
        conv = m.conv if isinstance(m, FusedUnit) else m
        kh, kw = conv.kernel_size
        macs.append(out[0].numel() * (conv.in_channels // conv.groups) * kh * kw)

    def linear_hook(m: nn.Linear, inputs, out):
        macs.append(out[0].numel() * m.in_features)

    meta = model if next(model.parameters()).is_meta else copy.deepcopy(model).to("meta")
    hooks = [m.register_forward_hook(linear_hook if isinstance(m, nn.Linear) else conv_hook)
             for m in meta.modules() if isinstance(m, (nn.Conv2d, nn.Linear, FusedUnit))]
    training = meta.training
    try:
        with torch.no_grad():
            meta.eval()(torch.empty(1, in_channels, size, size, device="meta"))
    finally:
        meta.train(training)
        for h in hooks:
            h.remove()
    return sum(macs)


def summary_rows(names: Optional[Iterable[str]] = None, norms: Iterable[str] = fused.NORMS,
                 order: str = "conv-bn-relu", num_classes: int = 10, in_channels: int = 3,
                 **options) -> List[Dict]:
    """One dict per network × norm: network, norm, order, input (side in pixels), params,
    macs (per image). Models are built on the meta device, so this takes well under a second
    per network."""
    import models

    rows = []
    for name in (models.NAMES if names is None else names):
        size = models.input_size(name, **options)
        for norm in norms:
            with torch.device("meta"):
                model = models.build(name, order, norm, "eager", in_channels, num_classes,
                                     **options)
            rows.append(dict(network=name, norm=norm, order=order, input=size,
                             params=count_params(model),
                             macs=count_macs(model, size, in_channels)))
    return rows


_COLUMNS = (("network", "network", "{}"), ("norm", "norm", "{}"), ("order", "order", "{}"),
            ("input", "input", "{0}x{0}"), ("params", "params", "{:,}"),
            ("macs", "MACs/image", "{:,}"))


def format_table(rows: List[Dict]) -> str:
    """`summary_rows()` as an aligned text table (numbers right-aligned, with thousands
    separators)."""
    header = [title for _, title, _ in _COLUMNS]
    body = [[fmt.format(row[key]) for key, _, fmt in _COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    numeric = [key in ("params", "macs") for key, _, _ in _COLUMNS]

    def line(cells):
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(cells, widths, numeric)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in body])
