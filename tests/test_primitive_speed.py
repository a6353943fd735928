"""A guard against a primitive falling out of vectorized code on some machine.

The ReLU placement only adds a compare and a select to each C++ primitive, so every mode runs
at the speed of the mode without ReLU. Once, on an AVX2 machine, backward_apply with the ReLU
before the norm compiled to scalar branches mispredicted on half of the values and ran 15x
slower than the other modes; no correctness test saw it, and the AVX-512 machine it was
written on never showed it. bfloat16 had the same trouble in apply and backward_apply (their
conversions kept the loops scalar) until they went through float buffers. This test times
each primitive per mode on the same random data (interleaved, medians) and fails beyond 3x
the time of mode none: far above the noise of this machine (±15 %), far below the slowdown
of a lost vectorization.

The timing runs in a child process with the benchmarks' allocator settings (DESIGN §8): with
glibc's defaults some output tensors come from fresh mmap'd pages, and their page faults made
single primitives 6x slower in some processes.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fused
from benchmarks import common

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(fused.extension_error() is not None,
                                reason="the C++ extension did not build")

RELU_MODES = {0: "none", 1: "after", 2: "before"}
LIMIT = 3.0


def median_times(calls, rounds=15):
    """Median seconds of each callable, taken round-robin so that drift hits all alike."""
    for f in calls.values():
        f()
    samples = {k: [] for k in calls}
    for _ in range(rounds):
        for k, f in calls.items():
            start = time.perf_counter()
            f()
            samples[k].append(time.perf_counter() - start)
    return {k: sorted(v)[len(v) // 2] for k, v in samples.items()}


def slow_modes(channels_last, dtype="float32"):
    """{primitive and mode: its time / the time without ReLU} for the modes beyond LIMIT."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    ops = torch.ops.bnorder_cpu
    shape = (64, 16, 32, 32)  # 4 MiB per tensor: long enough to time, quick to run
    dtype = getattr(torch, dtype)
    t = torch.randn(shape).to(dtype).contiguous(memory_format=memory_format)  # half ≤ 0
    g = torch.randn(shape).to(dtype).contiguous(memory_format=memory_format)
    c = shape[1]
    mean, scale, shift = torch.randn(c), torch.rand(c) + 0.5, torch.randn(c)
    k1, k2, k3 = torch.rand(c) + 0.5, torch.randn(c), torch.randn(c)
    primitives = {
        "stats": lambda m: ops.stats(t, m, False),
        "apply": lambda m: ops.apply(t, scale, shift, m),
        "backward_reduce": lambda m: ops.backward_reduce(g, t, mean, scale, shift, m),
        "backward_apply": lambda m: ops.backward_apply(g, t, mean, scale, shift, k1, k2, k3, m),
    }
    calls = {(name, mode): (lambda f=f, mode=mode: f(mode))
             for name, f in primitives.items() for mode in RELU_MODES}
    times = median_times(calls)
    return {f"{name} relu {RELU_MODES[mode]}": round(times[name, mode] / times[name, 0], 1)
            for name, mode in calls if times[name, mode] > LIMIT * times[name, 0]}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_relu_modes_run_as_fast_as_no_relu(channels_last, dtype):
    code = ("import json; from tests.test_primitive_speed import slow_modes; "
            f"print(json.dumps(slow_modes({channels_last}, {dtype!r})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **common.ALLOCATOR_ENV})
    assert proc.returncode == 0, proc.stderr[-3000:]
    slow = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not slow, f"slower than {LIMIT}x the same primitive without ReLU: {slow}"
