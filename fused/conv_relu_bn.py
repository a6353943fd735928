"""conv-relu-bn: a = norm(relu(conv(x, W) + bias)).

Training, with y = conv(x):  mean, var = stats(relu(y)) (the ReLU applied on load, relu(y)
never stored);  a = apply(y) = max(y, 0)·s + b.
Backward: r = relu(y) recomputed on load;  Σg, Σg(r − mean) = backward_reduce;
          dy = [y > 0]·s·(g − Σg/M − r̂·Σg r̂/M);  conv backward.
Eval: relu(y)·s + b in one pass (the ReLU between conv and norm prevents folding).
The op itself, shared with conv-bn-relu, is in _conv_then_norm.
"""
from __future__ import annotations

from . import _conv_then_norm, _unit

conv_relu_bn = _unit.functional("conv-relu-bn", _conv_then_norm.forward,
                            "norm(relu(conv2d(input)))")
