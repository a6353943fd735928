"""Interleaved step-time measurement for the study's throughput and BN-tax figures (DESIGN §7).

Training runs execute one after another while the machine's load changes, so their step
times are not comparable across configurations. Here, per network, every configuration ×
backend of the study is built once and trained on one fixed batch in rounds: each round runs
one SGD step of every configuration (in a rotated order), and the median over rounds is the
step time. Same process, same batch, same memory format and allocator for every provider.
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

from . import data as data_mod
from .train import TrainConfig, build_model


def _step(model, optimizer, x, y) -> float:
    t = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - t


def measure(spec: Dict, dataset: data_mod.Dataset, configs: List[tuple],
            rounds: int, batch_size: int, budget_s: float) -> Dict:
    """{"model|label|backend": {"step_s": median, "rounds": n, ...}} for every network of
    `spec` and every (label, order, norm, backend) in `configs`. After `budget_s` seconds a
    network stops adding rounds (keeping at least two); the rounds done are recorded."""
    x, y = data_mod.fixed_batch(dataset, batch_size)
    if len(y) < batch_size:        # a small subset: repeat it up to the batch size
        reps = -(-batch_size // len(y))
        x, y = x.repeat(reps, 1, 1, 1)[:batch_size], y.repeat(reps)[:batch_size]
    per_model = budget_s / max(1, len(spec["models"]))
    results = {}
    for model in spec["models"]:
        nets = {}
        for label, order, norm, backend in configs:
            torch.manual_seed(0)
            cfg = TrainConfig(model=model, order=order, norm=norm, fused=backend == "fused",
                              data=spec["data"])
            net = build_model(cfg, dataset).train()
            opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=spec["momentum"],
                                  weight_decay=spec["weight_decay"])
            _step(net, opt, x, y)                           # warm-up
            nets[(label, backend)] = (net, opt)
        times = {k: [] for k in nets}
        keys = list(nets)
        t0 = time.perf_counter()
        for r in range(rounds):
            for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                times[k].append(_step(*nets[k], x, y))
            if r >= 1 and time.perf_counter() - t0 > per_model:
                break
        for (label, backend), ts in times.items():
            results[f"{model}|{label}|{backend}"] = {
                "step_s": statistics.median(ts), "rounds": len(ts), "batch_size": batch_size,
                "images_per_s": batch_size / statistics.median(ts)}
        del nets
        gc.collect()
    return results
