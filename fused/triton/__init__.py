"""Triton kernels for the fused BN units (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

    primitives    the four BN primitives of DESIGN §4 (stats, apply, backward_reduce,
                  backward_apply) — the `triton` backend of fused/_backend.py
    norm_kernels  their kernels
    conv_kernels  implicit-GEMM convolution (forward, input gradient, weight gradient) with
                  the BN prologues and epilogues
    conv          launchers for those kernels and the conv_impl choice (BNORDER_CONV_IMPL)
    ops           the order ops on Triton convolutions (what _conv_then_norm and
                  bn_conv_relu call when conv_impl is "triton")

Kernel design, bytes moved and expected GPU figures: README.md in this folder.
"""

import warnings as _warnings

import torch as _torch
import triton as _triton

from .._pins import untested as _untested

# A pair outside fused/_pins.py may work, but nothing here was tested on it.
_problem = _untested(_torch.__version__, _triton.__version__)
if _problem:
    _warnings.warn(f"fused.triton: {_problem}; the kernels may still work, untested",
                   stacklevel=2)
