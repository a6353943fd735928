"""Which implementation of the four primitives runs for a tensor.

    cuda tensor -> triton          cpu tensor -> cpp (or reference if the extension is missing)

The environment variable FUSED_BACKEND (auto, cpp, triton, reference) overrides the choice;
`triton` on CPU tensors runs the kernels in Triton's interpreter (set TRITON_INTERPRET=1
before the kernels are imported)."""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from . import _ext, reference

BACKENDS = ("auto", "cpp", "triton", "reference")

_reference = SimpleNamespace(name="reference", stats=reference.stats, apply=reference.apply,
                             backward_reduce=reference.backward_reduce,
                             backward_apply=reference.backward_apply,
                             add_map_relu=reference.add_map_relu,
                             relu_grad_batch_sum=reference.relu_grad_batch_sum)


def requested() -> str:
    value = os.environ.get("FUSED_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"FUSED_BACKEND={value!r} is not one of {BACKENDS}")
    return value


# (FUSED_BACKEND as set, device type) -> backend name. The lookup runs several times per unit
# and step; the environment is still read every time, so a change takes effect at once.
_names: dict = {}


def name_for(device: torch.device | str = "cpu") -> str:
    """The backend that runs for tensors on `device`."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    key = (os.environ.get("FUSED_BACKEND"), device_type)
    name = _names.get(key)
    if name is None:
        name = _names[key] = _resolve(requested(), device_type)
    return name


def _resolve(choice: str, device_type: str) -> str:
    if choice == "auto":
        if device_type == "cuda":
            return "triton"
        return "cpp" if _ext.loaded else "reference"
    if choice == "cpp":
        if not _ext.loaded:
            raise RuntimeError(f"FUSED_BACKEND=cpp but the C++ extension is not loaded: "
                               f"{_ext.error()}")
        if device_type != "cpu":
            raise RuntimeError(f"FUSED_BACKEND=cpp runs on CPU tensors only, got {device_type}")
    return choice


def conv_impl(x: torch.Tensor, weight: torch.Tensor, groups: int) -> str:
    """"triton" when the Triton backend runs for x and picks its fused implicit-GEMM
    convolution (BNORDER_CONV_IMPL, rule in fused/triton/conv.py), else "aten"."""
    if name_for(x.device) != "triton":
        return "aten"
    from .triton import conv as triton_conv
    return triton_conv.select(x, weight, groups)


def primitives_reference():
    """The plain-torch primitives, whatever the backend."""
    return _reference


def primitives(t: torch.Tensor):
    """The four primitives for tensor t: an object with stats, apply, backward_reduce,
    backward_apply."""
    name = name_for(t.device)
    if name == "cpp":
        from . import _cpp
        return _cpp
    if name == "triton":
        from .triton import primitives as triton_primitives
        return triton_primitives
    return _reference
