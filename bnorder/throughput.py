"""Interleaved step-time measurement for the study's throughput and BN-tax figures (DESIGN §7).

Training runs execute one after another while the machine's load changes, so their step
times are not comparable across configurations. Here, per network, every configuration ×
backend of the study is built once and trained on one fixed batch in rounds: each round runs
one SGD step of every configuration (in a rotated order), and the median over rounds is the
step time. Same process, same batch, same memory format and allocator for every provider.

Every backend of the study is measured, whether or not it has training runs: eager and
fused networks of one configuration start from the same parameters (one seed) and take the
same steps on the same batch, so their losses over the rounds also check that the two
backends compute the same function (`agreement`), at no extra cost.
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

from . import data as data_mod
from .common import network_settings
from .train import TrainConfig, build_model


def _step(model, optimizer, x, y) -> tuple:
    t = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - t, float(loss.detach())


def agreement(eager: Dict, fused: Dict) -> float | None:
    """Largest relative difference between the eager and the fused network's losses over the
    rounds both measured (the warm-up step's loss included), or None if either is missing."""
    a, b = eager.get("losses"), fused.get("losses")
    if not a or not b:
        return None
    n = min(len(a), len(b))
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a[:n], b[:n]))


def measure(spec: Dict, dataset: data_mod.Dataset, configs: List[tuple],
            rounds: int, batch_size: int, budget_s: float) -> Dict:
    """{"model|label|backend": {"step_s": median, "rounds": n, "losses": [...], ...}} for
    every network of `spec`, every (label, order, norm) in `configs` and every backend of
    the study (`spec["backends"]`, plus any backend named in `configs`). After `budget_s`
    seconds a network stops adding rounds (keeping at least two); the rounds done are
    recorded."""
    settings = {m: network_settings(spec, m) for m in spec["models"]}
    channels_last = any(s["channels_last"] for s in settings.values())
    x, y = data_mod.fixed_batch(dataset, batch_size, channels_last)
    if len(y) < batch_size:        # a small subset: repeat it up to the batch size
        reps = -(-batch_size // len(y))
        x, y = x.repeat(reps, 1, 1, 1)[:batch_size], y.repeat(reps)[:batch_size]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
    backends = list(dict.fromkeys(list(spec["backends"]) + [c[3] for c in configs]))
    cells = list(dict.fromkeys((c[0], c[1], c[2], b) for c in configs for b in backends))
    per_model = budget_s / max(1, len(spec["models"]))
    results = {}
    for model in spec["models"]:
        nets, losses = {}, {}
        for label, order, norm, backend in cells:
            torch.manual_seed(0)
            cfg = TrainConfig(model=model, order=order, norm=norm, fused=backend == "fused",
                              data=spec["data"], **dict(settings[model], lr=1e-3))
            net = build_model(cfg, dataset).train()
            opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=spec["momentum"],
                                  weight_decay=spec["weight_decay"])
            losses[(label, backend)] = [_step(net, opt, x, y)[1]]      # warm-up
            nets[(label, backend)] = (net, opt)
        times = {k: [] for k in nets}
        keys = list(nets)
        t0 = time.perf_counter()
        for r in range(rounds):
            for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                step_s, loss = _step(*nets[k], x, y)
                times[k].append(step_s)
                losses[k].append(loss)
            if r >= 1 and time.perf_counter() - t0 > per_model:
                break
        for (label, backend), ts in times.items():
            results[f"{model}|{label}|{backend}"] = {
                "step_s": statistics.median(ts), "rounds": len(ts), "batch_size": batch_size,
                "images_per_s": batch_size / statistics.median(ts),
                "losses": losses[(label, backend)]}
        del nets
        gc.collect()
    return results
