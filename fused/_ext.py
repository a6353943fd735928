"""Loading the C++ extension, keeping its error instead of failing the import.

``import fused`` must work on a machine where the extension did not build: CPU tensors then
run the reference backend (plain torch primitives, correct but slower), a warning says so
once, and ``bnorder check`` / ``fused.extension_error()`` show why."""
from __future__ import annotations

import warnings

_error: str | None = None
try:
    from . import _C  # noqa: F401  (registers torch.ops.bnorder_cpu.*)
    loaded = True
except Exception as exc:  # ImportError, or an undefined symbol from mismatched torch headers
    loaded = False
    _error = f"{type(exc).__name__}: {exc}"


def error() -> str | None:
    """Why the extension is not loaded, or None when it is."""
    return _error


def warn_if_missing() -> None:
    if not loaded:
        warnings.warn(
            "bnorder: the C++ extension (fused._C) is not available, so fused ops on CPU "
            "tensors use the reference backend (plain torch primitives, slower than eager "
            f"PyTorch). Rebuild with `make setup`. Cause: {_error}", RuntimeWarning, stacklevel=3)
