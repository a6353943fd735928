"""conv-bn-relu (Ioffe & Szegedy 2015): a = relu(norm(conv(x, W) + bias)).

Training, with y = conv(x):  mean, var = stats(y);
          a = apply(y, mean, s, b) = max((y − mean)·s + b, 0)   (s, b as in _norm).
Backward: g' = g·[(y − mean)·s + b > 0] (mask recomputed from y, never stored);
          Σg', Σg'(y − mean) = backward_reduce;  dy = s·(g' − Σg'/M − ŷ·Σg'ŷ/M);  conv backward.
Eval: the norm folds into the convolution, a = relu(conv(x, W·s, bias·s + b − mean·s)).
The op itself, shared with conv-relu-bn, is in _conv_then_norm.
"""
from __future__ import annotations

from . import _conv_then_norm, _unit

conv_bn_relu = _unit.functional("conv-bn-relu", _conv_then_norm.forward,
                            "relu(norm(conv2d(input)))")
