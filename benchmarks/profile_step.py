"""Where a network's training step goes: the framework's convolutions against everything else.

    python -m benchmarks.profile_step [--network resnet20] [--orders conv-bn-relu,...]
                                      [--formats nchw,nhwc] [--rounds 9] [--json FILE]

For each order and memory format it builds the step of `benchmarks.network_step` for

    none           the network with an empty norm slot (eager; the reference of the BN tax)
    eager          plain torch modules
    fused          this package
    compile        torch.compile (inductor) of the eager network
    compile-fused  torch.compile (inductor) of the fused network

times the steps interleaved (medians), then runs a few steps of each under torch.profiler
and sums the time of the outermost ATen convolution calls (forward `aten::convolution`,
backward `aten::convolution_backward`, whoever calls them: eager modules, the fused C++
nodes or inductor's extern kernels). The convolution FLOPs of one step come from
torch.utils.flop_counter, and the machine's dense fp32 rate is measured once with a large
torch.mm (the best rate a library reaches on this CPU).

Why: every provider here runs the same ATen convolutions, so their time is a floor that no
BN implementation on top of them can go below. It then marks the targets of
benchmarks/targets.py that these steps measure (the network's fused BN tax, fused vs eager,
compiled fused vs compiled eager) ✓ or ✗ with the measured figure; `python -m
benchmarks.report` renders the JSON it writes as Markdown.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import tempfile
import time
from typing import Dict, List

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import fused
from benchmarks import cases, common
from benchmarks import targets as tg

PROVIDERS = ("none", "eager", "fused", "compile", "compile-fused")
CONV_OPS = ("aten::convolution", "aten::convolution_backward")

_gemm_rate: float | None = None


def gemm_rate(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of torch.mm on n x n fp32 matrices, best of `repeats`: the dense rate the
    machine's best library code reaches, the ceiling any convolution can hope for."""
    global _gemm_rate
    if _gemm_rate is None:
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - start)
        _gemm_rate = 2 * n ** 3 / best
    return _gemm_rate


def conv_flops(step) -> int:
    """Convolution FLOPs (forward and backward) of one call of `step`."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    per_op = counter.get_flop_counts()["Global"]
    return int(sum(v for k, v in per_op.items() if "convolution" in str(k)))


@contextlib.contextmanager
def profiler_log_filtered():
    """The profiler library writes a start and a stop line to fd 2 on every profile, which
    no setting silences; hold fd 2 in a file and pass on every other line afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            for line in held.read().decode(errors="replace").splitlines(keepends=True):
                if "profiler_start" not in line and "profiler_stop" not in line:
                    sys.stderr.write(line)


def conv_seconds(step) -> float:
    """Seconds spent inside the outermost ATen convolution calls of one step."""
    with profiler_log_filtered(), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    total_us = 0.0
    for event in prof.events():
        if event.name not in CONV_OPS:
            continue
        parent, nested = event.cpu_parent, False
        while parent is not None:
            if parent.name in CONV_OPS:
                nested = True
                break
            parent = parent.cpu_parent
        if not nested:
            total_us += event.cpu_time_total
    return total_us / 1e6


def profile(network: str, order: str, fmt: str, rounds: int, batch: int,
            providers=PROVIDERS, profiled_rounds: int = 5) -> Dict:
    """Median step time of every provider (interleaved, unprofiled) and the median time of
    its convolutions (`profiled_rounds` profiled steps, providers taking turns too)."""
    if "none" not in providers or "fused" not in providers:
        raise ValueError("profile needs the providers 'none' and 'fused'")
    bad = [p for p in providers if p not in PROVIDERS]
    if bad:
        raise ValueError(f"unknown provider {bad[0]!r}; expected some of {', '.join(PROVIDERS)}")
    steps, compile_s = {}, {}
    for provider in providers:
        norm = "none" if provider == "none" else "bn"
        backend = "eager" if provider == "none" else provider
        steps[provider], seconds = cases.network_step(network, order, norm, backend, batch,
                                                      fmt)
        if seconds is not None:
            compile_s[provider] = seconds
    samples = common.time_interleaved(steps, rounds=rounds, inner=1, warmup=2)
    convs: Dict[str, List[float]] = {p: [] for p in steps}
    # one discarded profiled round, as the timing's warm-up; single steps of this machine
    # now and then take 80-170 ms longer, inside the convolutions too, hence a median of
    # several profiled rounds
    for round_ in range(1 + profiled_rounds):
        for provider, step in steps.items():
            seconds = conv_seconds(step)
            if round_:
                convs[provider].append(seconds)
    row = dict(network=network, order=order, format=fmt, batch=batch, compile_s=compile_s,
               conv_gflop=conv_flops(steps["none"]) / 1e9, providers={})
    for provider in steps:
        seconds, conv = common.median(samples[provider]), common.median(convs[provider])
        row["providers"][provider] = dict(step_ms=seconds * 1e3, conv_ms=conv * 1e3,
                                          conv_share=conv / seconds,
                                          conv_gflops=row["conv_gflop"] / conv)
    return row


def show(rows: List[Dict], rate: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=140)
    network = rows[0]["network"]
    table = Table(title=f"{network} training step: ATen convolutions vs the rest "
                        f"(torch.mm rate {rate / 1e9:.0f} GFLOP/s)")
    for col in ("order", "format", "provider", "step ms", "conv ms",
                "conv share", "rest ms", "conv GFLOP/s", "of mm rate"):
        table.add_column(col, justify="right" if "ms" in col or "GFLOP" in col
                         or "share" in col or "rate" in col else "left")
    for row in rows:
        for provider, p in row["providers"].items():
            table.add_row(row["order"], row["format"], provider,
                          f"{p['step_ms']:.1f}", f"{p['conv_ms']:.1f}",
                          f"{100 * p['conv_share']:.0f} %",
                          f"{p['step_ms'] - p['conv_ms']:.1f}", f"{p['conv_gflops']:.0f}",
                          f"{100 * p['conv_gflops'] * 1e9 / rate:.0f} %")
        table.add_section()
    console.print(table)
    if any(p["conv_share"] > 1 for row in rows for p in row["providers"].values()):
        console.print("conv ms above step ms: the two are medians of separate steps, and "
                      "this machine is noisy; raise --rounds or --batch")
    targets = Table(title="targets (benchmarks/targets.py) these steps measure")
    # what measures each target and why: benchmarks/targets.py and the Markdown report
    for col in tg.HEADER[:5]:
        targets.add_column(col)
    for verdict in tg.rows(tg.evaluate(tg.from_profile(rows))):
        targets.add_row(*verdict[:5])
    console.print(targets)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", default="resnet20", choices=cases.NETWORKS)
    parser.add_argument("--orders", default=",".join(fused.ORDERS))
    parser.add_argument("--formats", default="nchw,nhwc")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch", type=int, default=cases.BATCH)
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    orders = args.orders.split(",")
    formats = args.formats.split(",")
    for name, values, allowed in (("order", orders, fused.ORDERS),
                                  ("format", formats, tuple(cases.FORMATS))):
        bad = [v for v in values if v not in allowed]
        if bad:
            parser.error(f"unknown {name} {bad[0]!r}; choose from {', '.join(allowed)}")
    if args.rounds < 1 or args.batch < 1:
        parser.error("--rounds and --batch must be positive")
    common.ensure_allocator_env("benchmarks.profile_step")
    rate = gemm_rate()
    rows = []
    for order, fmt in tqdm([(o, f) for o in orders for f in formats], desc="profile",
                           unit="case", file=sys.stderr):
        rows.append(profile(args.network, order, fmt, args.rounds, args.batch))
    show(rows, rate)
    if args.json:
        when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        with open(args.json, "w") as f:
            json.dump(dict(gemm_gflops=rate / 1e9, threads=torch.get_num_threads(),
                           machine=f"cpu-{os.cpu_count()}core", datetime=when, rows=rows),
                      f, indent=1)


if __name__ == "__main__":
    main()
