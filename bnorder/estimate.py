"""How long a study will take, from a short timing of each of its configurations, printed
before the first run starts.

Every distinct (network, order, norm, backend) among the runs still to do is built as its
runs build it (width, memory format, batch size, data) and timed on a few real training
steps and one evaluation batch, after a warm-up step (the first step of a fresh model pays
for allocations and kernel selection). A run's estimate is then

    epochs × (steps per epoch × step + evaluation batches × evaluation batch) + set-up

with set-up the measured model construction plus the two gradient-flow probes (one step on
the probe batch each). Two warm-up steps and one warm-up evaluation batch come first: the
first calls of a fresh model allocate, select kernels and (in evaluation) fold the norms.
With N local workers (`--workers N`) each configuration is timed at cores/N threads, as
each worker runs, and the total is when a pool of N finishes the runs in order; the workers
then also share memory bandwidth, which one timing alone does not see. The figure holds for
the machine as loaded while it is measured: on a shared machine whose load changes, runs
take correspondingly longer or shorter.
"""
from __future__ import annotations

import heapq
import math
import statistics
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

from . import data as data_mod
from .train import build_model, prepare_data

TIMED_STEPS = 3
WARMUP = 2       # the first steps of a fresh model allocate and select kernels


def _key(run: Dict) -> tuple:
    return (run["model"], run["label"], run["backend"])


def _time_config(config, dataset: data_mod.Dataset, steps: int) -> Dict:
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    model = build_model(config, dataset).train()
    build_s = time.perf_counter() - t0
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    times = []
    batches = data_mod.train_batches(dataset, config.batch_size, generator,
                                     config.channels_last)
    for i in range(steps + WARMUP):
        try:
            x, y = next(batches)
        except StopIteration:       # a subset smaller than the timed batches: start again
            batches = data_mod.train_batches(dataset, config.batch_size, generator,
                                             config.channels_last)
            x, y = next(batches)
        t = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= WARMUP:
            times.append(time.perf_counter() - t)
    eval_batch = max(config.batch_size, 256)      # what train.evaluate uses
    x, _ = next(data_mod.test_batches(dataset, eval_batch, config.channels_last))
    model.eval()
    with torch.no_grad():
        model(x)                    # the first evaluation-mode call folds and allocates
        t = time.perf_counter()
        model(x)
    eval_s = (time.perf_counter() - t) * eval_batch / len(x)
    return {"step_s": statistics.median(times), "eval_s": eval_s, "build_s": build_s}


def run_seconds(config, timing: Dict, dataset: data_mod.Dataset) -> float:
    """The estimated duration of one run of `config` from its configuration's timing."""
    n_train = len(dataset.train_y) if config.subset is None else min(config.subset,
                                                                    len(dataset.train_y))
    n_test = len(dataset.test_y) if config.test_subset is None else min(config.test_subset,
                                                                       len(dataset.test_y))
    steps = data_mod.steps_per_epoch(n_train, config.batch_size)
    evals = math.ceil(n_test / max(config.batch_size, 256))
    probe = 2 * timing["step_s"] * min(config.gradflow_batch, n_train) / config.batch_size
    return (config.epochs * (steps * timing["step_s"] + evals * timing["eval_s"])
            + timing["build_s"] + probe)


def wall_seconds(durations: List[float], workers: int) -> float:
    """When the last of `durations` ends if `workers` slots take them in order, each the
    next as soon as it is free (the local executor's pool)."""
    free = [0.0] * max(1, workers)
    for d in durations:
        heapq.heapreplace(free, free[0] + d)
    return max(free)


def estimate(runs: List[Dict], dataset: data_mod.Dataset, steps: int = TIMED_STEPS,
             progress: bool = True, workers: int = 1) -> Dict:
    """Time each configuration of `runs` (dicts of study.grid) and estimate every run.
    With `workers` local worker processes each configuration is timed at a worker's thread
    count (the cores shared out, as the executor sets it) and the total is the pool's wall
    time. Returns {"configs": {(model, label, backend): timing + runs + seconds},
    "total_s", "sum_s", "workers", "timing_s"}."""
    from .executors import threads_per_worker
    previous_threads = torch.get_num_threads()
    if workers > 1:
        torch.set_num_threads(threads_per_worker(workers))
    try:
        return _estimate(runs, dataset, steps, progress, workers)
    finally:
        torch.set_num_threads(previous_threads)


def _estimate(runs, dataset, steps, progress, workers) -> Dict:
    from tqdm import tqdm
    t0 = time.perf_counter()
    firsts: Dict[tuple, Dict] = {}
    for r in runs:
        firsts.setdefault(_key(r), r)
    subset = {}
    timings = {}
    bar = tqdm(firsts.items(), desc="timing each configuration", unit="config",
               disable=not progress, leave=False, dynamic_ncols=True)
    for key, r in bar:
        bar.set_postfix_str(" ".join(key), refresh=True)
        cfg = r["config"]
        part = (cfg.subset, cfg.test_subset)
        if part not in subset:
            subset[part] = prepare_data(cfg, dataset)
        timings[key] = _time_config(cfg, subset[part], steps)
    bar.close()
    configs = {k: dict(v, runs=0, seconds=0.0) for k, v in timings.items()}
    each = []
    for r in runs:
        cfg = r["config"]
        c = configs[_key(r)]
        c["runs"] += 1
        each.append(run_seconds(cfg, timings[_key(r)], subset[(cfg.subset, cfg.test_subset)]))
        c["seconds"] += each[-1]
    return {"configs": configs, "total_s": wall_seconds(each, workers), "sum_s": sum(each),
            "workers": workers, "threads": torch.get_num_threads(),
            "timing_s": time.perf_counter() - t0, "steps": steps}


def duration(seconds: float) -> str:
    """12 s, 3 min 05 s, 7 h 12 min."""
    if not math.isfinite(seconds):
        return "—"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def print_estimate(est: Dict, budget_s: float | None = None, extra_s: float = 0.0) -> None:
    """The per-configuration table and the total, in the terminal. `extra_s`: work after the
    runs that the total includes (the throughput measurement's budget)."""
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"estimated duration (timed: {est['steps']} training steps and one "
                        f"evaluation batch per configuration, {est['timing_s']:.0f} s)")
    for col in ("model", "config", "backend", "step", "eval batch", "runs", "per run",
                "all runs"):
        table.add_column(col, justify="left" if col in ("model", "config", "backend")
                         else "right")
    for (model, label, backend), c in est["configs"].items():
        table.add_row(model, label, backend, f"{1000 * c['step_s']:.0f} ms",
                      f"{1000 * c['eval_s']:.0f} ms", str(c["runs"]),
                      duration(c["seconds"] / max(1, c["runs"])), duration(c["seconds"]))
    console = Console(width=120)
    console.print(table)
    total = est["total_s"] + extra_s
    workers = est.get("workers", 1)
    line = f"estimated duration: {duration(total)} (training {duration(est['total_s'])}"
    if workers > 1:
        threads = est.get("threads", "?")
        line += (f" on {workers} workers at {threads} thread{'' if threads == 1 else 's'} each, "
                 f"{duration(est['sum_s'])} of runs in all")
    line += f", then up to {duration(extra_s)} of step-time measurement)" if extra_s else ")"
    console.print(line, highlight=False)
    if budget_s is not None and est["total_s"] > budget_s:
        console.print(f"the training estimate exceeds the time budget of "
                      f"{duration(budget_s)}: runs that would start after it are left for "
                      "a rerun of the same command", highlight=False)
