"""The functional entry shared by the three orders: argument normalization, validation,
the choice between batch and running statistics, and the running-statistics update.

Each order supplies only its fused op (`forward`): everything around it is here, once."""
from __future__ import annotations

from typing import Callable, Optional

import torch.nn.functional as F
from torch import Tensor

from . import _conv, _norm, sync as _sync
from .reference import RELU_AFTER, RELU_BEFORE, RELU_NONE


def run(op_name: str, order: str, fused_forward: Callable, input: Tensor, weight: Tensor,
        bias: Optional[Tensor], stride, padding, dilation, groups: int,
        running_mean: Optional[Tensor], running_var: Optional[Tensor],
        norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], training: bool,
        momentum: Optional[float], eps: float, norm: str, relu: bool,
        sync: int = _sync.NO_SYNC) -> Tensor:
    stride = _conv.pair(stride, "stride")
    padding = _conv.pair(padding, "padding")
    dilation = _conv.pair(dilation, "dilation")
    norm_sees = "input" if order == "bn-conv-relu" else "output"
    _norm.check_unit_inputs(op_name, input, weight, bias, stride, padding, dilation, groups,
                            norm, norm_sees, running_mean, running_var, norm_weight,
                            norm_bias, training)
    input = _conv.dense(input)
    if norm == "none":
        # Nothing to fuse: the unit is conv -> ReLU, exactly as eager runs it.
        y = _conv.conv(input, weight, bias, stride, padding, dilation, groups)
        return F.relu(y) if relu else y
    if norm == "bn-minus":
        norm_weight = norm_bias = None
    batch_stats = _norm.uses_batch_stats(norm, training, running_mean)
    if batch_stats and training and running_mean is not None and momentum is None:
        raise ValueError(f"{op_name}: momentum=None (cumulative average) is handled by the "
                         f"modules through num_batches_tracked; pass the averaging factor")
    stats_in = (None, None) if batch_stats or norm == "affine" else (running_mean, running_var)
    sync = sync if batch_stats else _sync.NO_SYNC
    relu_mode = (RELU_NONE if not relu else RELU_BEFORE if order == "conv-relu-bn"
                 else RELU_AFTER)
    out, mean, var, count = fused_forward(input, weight, bias, stride, padding, dilation,
                                          groups, norm_weight, norm_bias, *stats_in, eps,
                                          norm, relu_mode, sync)
    if batch_stats and training:
        if sync != _sync.NO_SYNC:
            count = _sync.merged_count(sync)
        _norm.update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return out


# order -> (op name, order, fused forward): what `run` needs, for the modules to call it
# directly.
FORWARDS = {}


def functional(order: str, fused_forward: Callable, formula: str) -> Callable:
    """The public functional of one order, e.g. fused.conv_bn_relu."""
    op_name = order.replace("-", "_")
    FORWARDS[order] = (op_name, order, fused_forward)

    def unit(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1,
             padding=0, dilation=1, groups: int = 1, running_mean: Optional[Tensor] = None,
             running_var: Optional[Tensor] = None, norm_weight: Optional[Tensor] = None,
             norm_bias: Optional[Tensor] = None, training: bool = False,
             momentum: Optional[float] = 0.1, eps: float = 1e-5, norm: str = "bn",
             relu: bool = True, sync: int = _sync.NO_SYNC) -> Tensor:
        return run(op_name, order, fused_forward, input, weight, bias, stride, padding,
                   dilation, groups, running_mean, running_var, norm_weight, norm_bias,
                   training, momentum, eps, norm, relu, sync)

    unit.__name__ = unit.__qualname__ = op_name
    unit.__doc__ = (f"{formula}: F.conv2d's arguments, then F.batch_norm's, then the norm "
                    f"variant ('bn', 'bn-minus', 'affine', 'none') and whether the ReLU is "
                    f"applied (relu=False drops it, e.g. before a residual addition); sync, a "
                    f"fused.sync.register(group) key, synchronizes batch statistics.")
    return unit
