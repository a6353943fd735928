"""The torch/triton pair bnorder is set up and tested with, and the range it supports.

The Triton a GPU user runs is the one torch's CUDA wheel requires, so the triton pin follows
the torch pin: pinning any other triton next to torch makes pip's resolution impossible on a
machine that takes torch's CUDA wheel from the registry. requirements.txt, setup.py,
pyproject.toml and the `make setup` torch choice (fused/_setup_torch.py) all read or are
checked against this file (tests/test_pins.py); it imports nothing, so setup.py can load it
before torch exists.
"""
from __future__ import annotations

from typing import Optional

TORCH = "2.13.0"

# What each supported torch minor's CUDA wheels require of triton (their Requires-Dist):
# the two Triton ends the kernels are tested on (`make test` and `make test-triton38`).
TRITON_FOR_TORCH = {"2.13": "3.7.1", "2.14": "3.8.0"}

TRITON = TRITON_FOR_TORCH[".".join(TORCH.split(".")[:2])]

# install_requires / build requirements: every torch minor above (2.13.x … 2.14.x).
TORCH_RANGE = ">=2.13,<2.15"
TRITON_RANGE = ">=3.7.1,<3.9"


def _release(version: str) -> tuple:
    """(major, minor, patch) of a version string such as '2.13.0+cpu' or '3.8.0'."""
    parts = version.split("+")[0].split(".")[:3]
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)


def untested(torch_version: str, triton_version: Optional[str]) -> Optional[str]:
    """None when this torch (and triton, if installed) is a tested pair; else why not."""
    minor = ".".join(str(v) for v in _release(torch_version)[:2])
    if minor not in TRITON_FOR_TORCH:
        return (f"torch {torch_version} is outside the tested range torch{TORCH_RANGE} "
                f"({', '.join(f'{t}.x with triton {r}' for t, r in TRITON_FOR_TORCH.items())})")
    # Either tested triton goes: CPU torch pins none, and the interpreter tests run on both.
    tested = sorted(set(TRITON_FOR_TORCH.values()))
    if triton_version is not None and _release(triton_version) not in map(_release, tested):
        return (f"triton {triton_version} is not one of the tested {', '.join(tested)} "
                f"(torch {minor}'s CUDA wheel requires {TRITON_FOR_TORCH[minor]})")
    return None
