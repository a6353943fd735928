"""Achieved bandwidth of the four C++ BN primitives against torch's own copy.

    python -m benchmarks.primitives [--shapes 128x64x128x128,128x16x32x32] [--rounds 5]

For each shape (NCHW and channels_last) it prints GB/s of stats (reads t), apply (reads t,
writes out), backward_reduce (reads g, t) and backward_apply (reads g, t, writes dt), and the
ratio to `clone()` of the same tensor (reads and writes it) measured in the same process.
The default first shape, 512 MiB, is larger than this machine's caches.
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
        "apply": (2, lambda: ops.apply(t, v[0], v[1], 1)),
        "backward_reduce": (2, lambda: ops.backward_reduce(g, t, v[0], v[1], v[2], 1)),
        "backward_apply": (3, lambda: ops.backward_apply(g, t, *v, 1)),
    }
    return {name: n * nbytes / _median_seconds(fn, rounds) for name, (n, fn) in passes.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="128x64x128x128,128x16x32x32,128x64x8x8")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    common.ensure_allocator_env("benchmarks.primitives")
    if fused.backend() != "cpp":
        raise SystemExit(f"the C++ extension is not loaded: {fused.extension_error()}")
    from rich.console import Console
    from rich.table import Table

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
