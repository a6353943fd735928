"""Achieved bandwidth of the four C++ BN primitives against torch's own copy.

    python -m benchmarks.primitives [--shapes 128x64x128x128,128x16x32x32] [--rounds 5]

For each shape (NCHW and channels_last) it prints GB/s of stats (reads t), apply (reads t,
writes out), backward_reduce (reads g, t) and backward_apply (reads g, t, writes dt), and the
ratio to `clone()` of the same tensor (reads and writes it) measured in the same process.
The default first shape, 512 MiB, is larger than this machine's caches.

    python -m benchmarks.primitives --relu-modes [--rounds 15]

prints, per primitive, layout and dtype (float32, bfloat16), the time with the ReLU after and
before the norm over the time without ReLU. The placement adds only a compare and a select
per value, so every ratio should be near 1; a ratio far above it (the table marks > 3x) means
a loop fell out of vectorized code on this machine, as backward_apply with the ReLU before the
norm once did on AVX2 (scalar branches mispredicted on half of the values, 15x slower) and
bfloat16 apply/backward_apply did before they went through float buffers.
"""
from __future__ import annotations

import argparse
import time

import torch

import fused
from benchmarks import common


def _median_seconds(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(shape, channels_last: bool, rounds: int) -> dict:
    ops = torch.ops.bnorder_cpu
    t = torch.randn(shape)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(t)
    v = [torch.rand(shape[1]) + 0.5 for _ in range(6)]
    nbytes = t.numel() * t.element_size()
    passes = {  # tensor-sized reads + writes of each call
        "copy": (2, lambda: t.clone()),
        "stats": (1, lambda: ops.stats(t, 0)),
        "apply": (2, lambda: ops.apply(t, v[0], v[1], v[2], 1)),
        "backward_reduce": (2, lambda: ops.backward_reduce(g, t, v[0], v[1], v[2], 1)),
        "backward_apply": (3, lambda: ops.backward_apply(g, t, *v, 1)),
    }
    return {name: n * nbytes / _median_seconds(fn, rounds) for name, (n, fn) in passes.items()}


RELU_MODES = {0: "none", 1: "after", 2: "before"}
SLOW_MODE_RATIO = 3.0


def _interleaved_medians(calls: dict, rounds: int) -> dict:
    """Median seconds of each callable, taken round-robin so that drift hits all alike."""
    for fn in calls.values():
        fn()
    samples = {k: [] for k in calls}
    for _ in range(rounds):
        for k, fn in calls.items():
            start = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - start)
    return {k: sorted(v)[len(v) // 2] for k, v in samples.items()}


def relu_mode_ratios(shape=(64, 16, 32, 32), channels_last: bool = False,
                     dtype: torch.dtype = torch.float32, rounds: int = 15) -> dict:
    """{(primitive, relu mode name): median time / median time of the same primitive without
    ReLU}, on the same random data (half of it ≤ 0)."""
    ops = torch.ops.bnorder_cpu
    layout = torch.channels_last if channels_last else torch.contiguous_format
    t = torch.randn(shape).to(dtype).contiguous(memory_format=layout)
    g = torch.randn(shape).to(dtype).contiguous(memory_format=layout)
    c = shape[1]
    mean, scale, shift = torch.randn(c), torch.rand(c) + 0.5, torch.randn(c)
    k1, k2, k3 = torch.rand(c) + 0.5, torch.randn(c), torch.randn(c)
    primitives = {
        "stats": lambda m: ops.stats(t, m, False),
        "apply": lambda m: ops.apply(t, mean, scale, shift, m),
        "backward_reduce": lambda m: ops.backward_reduce(g, t, mean, scale, shift, m),
        "backward_apply": lambda m: ops.backward_apply(g, t, mean, scale, shift, k1, k2, k3, m),
    }
    calls = {(name, mode): (lambda f=f, mode=mode: f(mode))
             for name, f in primitives.items() for mode in RELU_MODES}
    times = _interleaved_medians(calls, rounds)
    return {(name, RELU_MODES[mode]): times[name, mode] / times[name, 0]
            for name, mode in calls if mode != 0}


def _relu_mode_table(rounds: int):
    from rich.table import Table
    table = Table(title=f"ReLU placement cost per primitive: time / time without ReLU "
                        f"(64x16x32x32, medians of {rounds}; > {SLOW_MODE_RATIO:g}x marked !)")
    for col in ("dtype", "layout", "primitive", "relu after", "relu before"):
        table.add_column(col, justify="right" if col.startswith("relu") else "left")
    for dtype in (torch.float32, torch.bfloat16):
        for channels_last in (False, True):
            ratios = relu_mode_ratios(channels_last=channels_last, dtype=dtype, rounds=rounds)
            for name in ("stats", "apply", "backward_reduce", "backward_apply"):
                cells = [f"{ratios[name, m]:.2f}" + (" !" if ratios[name, m] > SLOW_MODE_RATIO
                                                     else "") for m in ("after", "before")]
                table.add_row(str(dtype).removeprefix("torch."),
                              "NHWC" if channels_last else "NCHW", name, *cells)
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="128x64x128x128,128x16x32x32,128x64x8x8")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--relu-modes", action="store_true",
                        help="time each primitive per ReLU placement instead of bandwidth")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    common.ensure_allocator_env("benchmarks.primitives")
    if fused.backend() != "cpp":
        raise SystemExit(f"the C++ extension is not loaded: {fused.extension_error()}")
    from rich.console import Console
    from rich.table import Table

    if args.relu_modes:
        Console(width=200).print(_relu_mode_table(args.rounds))
        return

    table = Table(title=f"BN primitives, fp32, {torch.get_num_threads()} threads "
                        f"(GB/s, % of clone(); largest cache {common.cache_bytes() >> 20} MiB)")
    for col in ("shape", "layout", "MiB", "copy", "stats", "apply", "backward_reduce",
                "backward_apply"):
        table.add_column(col, justify="left" if col in ("shape", "layout") else "right")
    for text in args.shapes.split(","):
        shape = tuple(int(d) for d in text.split("x"))
        if len(shape) != 4:
            raise SystemExit(f"--shapes: {text!r} is not NxCxHxW")
        for channels_last in (False, True):
            bw = measure(shape, channels_last, args.rounds)
            mib = torch.Size(shape).numel() * 4 / 2**20
            table.add_row(text, "NHWC" if channels_last else "NCHW", f"{mib:.0f}",
                          *[f"{bw[k] / 1e9:.1f} ({100 * bw[k] / bw['copy']:.0f}%)"
                            for k in ("copy", "stats", "apply", "backward_reduce",
                                      "backward_apply")])
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
