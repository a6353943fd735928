"""Synchronized batch statistics across a process group (nn.SyncBatchNorm semantics).

The fused ops cannot take a ProcessGroup argument (torch.library schemas hold tensors and
scalars), so groups live in a small registry and the ops carry an integer key; NO_SYNC (-1)
means local statistics and costs nothing. Two hooks, the same for every order and for the
eager `SyncBatchNorm2d`:

forward, between stats and apply: every rank contributes (n_r, mean_r, M2_r = var_r·n_r);
one all_gather, then Chan's parallel merge, stable for any mean and for uneven n_r:

    n = Σ n_r      mean = Σ n_r·mean_r / n      var = (Σ M2_r + Σ n_r·(mean_r − mean)²) / n

backward, between backward_reduce and backward_apply: one all_reduce (SUM) of
[Σg', Σg'(t − mean), n_r]; k2, k3 use the global sums and the global count M. dgamma and
dbeta stay local sums, as nn.SyncBatchNorm returns them: DistributedDataParallel then
averages them with every other parameter gradient.

Running statistics are updated with the global mean and the global unbiased variance
(var·M/(M − 1)), M taken from the merge.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _norm, reference

NO_SYNC = -1

_groups: List[Optional[object]] = []  # key -> process group (None: the default group)
_merged_counts: Dict[int, int] = {}   # key -> global count of the last forward merge


def register(process_group=None) -> int:
    """The key of `process_group` (None = the default group), registering it once."""
    for key, group in enumerate(_groups):
        if group is process_group:
            return key
    _groups.append(process_group)
    return len(_groups) - 1


def group_of(key: int):
    return _groups[key]


def merge_stats(key: int, mean: Tensor, var: Tensor, count: int):
    """Global (mean, biased var) from every rank's local ones (see the module docstring)."""
    group = _groups[key]
    channels = mean.numel()
    local = torch.cat([mean.new_full((1,), float(count)), mean, var * count]).double()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    table = torch.stack(parts)
    n, means, m2 = table[:, :1], table[:, 1:channels + 1], table[:, channels + 1:]
    total = n.sum()
    global_mean = (n * means).sum(0) / total
    global_m2 = m2.sum(0) + (n * (means - global_mean) ** 2).sum(0)
    _merged_counts[key] = int(total)
    return global_mean.to(mean.dtype), (global_m2 / total).to(var.dtype)


@torch.compiler.disable
def merged_count(key: int) -> int:
    """M of the last merge_stats with this key; read right after the op that merged (run
    eagerly under torch.compile, so the count is the one this call produced)."""
    return _merged_counts[key]


def backward_coefficients(key: int, sum_g: Tensor, sum_gtc: Tensor, scale: Tensor,
                          rstd: Tensor, count: int):
    """_norm.backward_coefficients with k1..k3 from the sums and count of every rank,
    dgamma and dbeta from this rank's sums."""
    channels = sum_g.numel()
    local = torch.cat([sum_g, sum_gtc, sum_g.new_full((1,), float(count))]).double()
    dist.all_reduce(local, group=_groups[key])
    total_g = local[:channels].to(sum_g.dtype)
    total_gtc = local[channels:2 * channels].to(sum_g.dtype)
    k1, k2, k3, _, _ = _norm.backward_coefficients(total_g, total_gtc, scale, rstd,
                                                    int(local[-1]), True)
    dgamma = (sum_gtc.double() * rstd.double()).to(sum_g.dtype)  # rounded once, as _norm's
    return k1, k2, k3, dgamma, sum_g


# ---------------------------------------------------------------- eager synchronized BN

class _SyncNorm(torch.autograd.Function):
    """norm(t) with statistics merged across the group; the reference primitives (plain
    torch ops) around the same two hooks as the fused ops."""

    @staticmethod
    def forward(ctx, t, weight, bias, eps, key):
        channels = t.shape[1]
        count = t.numel() // channels
        # Moments around a pivot (the first element per channel), the mean sent in float64:
        # a float32 mean far from zero (|mean| >> std) would cost the merge's between-rank
        # term its digits. (The fused ops send the float64 statistics of the C++ stats primitive.)
        pivot = t[:1, :, :1, :1]
        shifted_mean, var = reference.stats(t - pivot, 0)
        mean, var = merge_stats(key, shifted_mean.double() + pivot.double().flatten(), var,
                                count)
        norm = "bn" if weight is not None else "bn-minus"
        scale, shift, mean, rstd = _norm.coefficients(norm, mean, var, weight, bias, eps,
                                                      channels, t)
        ctx.save_for_backward(t, mean, scale, shift, rstd)
        ctx.args = (key, count, None if weight is None else weight.dtype)
        ctx.mark_non_differentiable(mean, var)
        # The statistics in float64, as every backend returns them.
        return reference.apply(t, mean, scale, shift, 0), mean, var.to(torch.float64)

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_var):
        t, mean, scale, shift, rstd = ctx.saved_tensors
        key, count, param_dtype = ctx.args
        sum_g, sum_gtc = reference.backward_reduce(grad, t, mean, scale, shift, 0)
        k1, k2, k3, dgamma, dbeta = backward_coefficients(key, sum_g, sum_gtc, scale, rstd,
                                                          count)
        dt = reference.backward_apply(grad, t, mean, scale, shift, k1, k2, k3, 0)
        if param_dtype is None:
            return dt, None, None, None, None
        return dt, dgamma.to(param_dtype), dbeta.to(param_dtype), None, None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training statistics are synchronized across a process group,
    on CPU and GPU alike (nn.SyncBatchNorm refuses CPU tensors); same state_dict as
    nn.BatchNorm2d, same merge as the fused ops."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype)
        self.sync_key = register(process_group)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        out, mean, var = _SyncNorm.apply(x, self.weight, self.bias, self.eps, self.sync_key)
        if self.track_running_stats:
            _norm.update_running_stats(self.running_mean, self.running_var, mean, var,
                                       merged_count(self.sync_key), factor)
        return out


def _synchronized(bn: nn.BatchNorm2d, key: int) -> SyncBatchNorm2d:
    """A SyncBatchNorm2d sharing bn's parameters and buffers."""
    sync = SyncBatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine,
                           bn.track_running_stats)
    sync.sync_key = key
    for name, value in list(bn.named_parameters(recurse=False)) + list(
            bn.named_buffers(recurse=False)):
        setattr(sync, name, value)
    sync.train(bn.training)
    return sync


def convert_sync_bn(module: nn.Module, process_group=None) -> nn.Module:
    """Like nn.SyncBatchNorm.convert_sync_batchnorm, for both backends: fused units
    synchronize their statistics through the group, every other nn.BatchNorm2d (the norm
    of eager units, stray norms) becomes a SyncBatchNorm2d sharing its tensors. Returns
    the converted module (a new one if `module` itself is an nn.BatchNorm2d)."""
    from .modules import FusedUnit
    key = register(process_group)

    def convert(m: nn.Module) -> nn.Module:
        if isinstance(m, FusedUnit):
            m.sync_key = key
            return m
        if isinstance(m, SyncBatchNorm2d):
            m.sync_key = key
            return m
        if isinstance(m, nn.BatchNorm2d):
            return _synchronized(m, key)
        for name, child in m.named_children():
            new = convert(child)
            if new is not child:
                setattr(m, name, new)
        return m

    return convert(module)
