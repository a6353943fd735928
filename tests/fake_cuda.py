"""Stand-ins for the CUDA runtime pieces that fused.timing injects, so that the CUDA code paths
of the check and the benchmarks run on a CPU machine. They record what was called, in order;
the time an event pair reports is the CPU clock between their record() calls."""
from __future__ import annotations

import time
from typing import List, Tuple

from fused.timing import CudaEventTimer, DoBenchTimer


class Log:
    def __init__(self):
        self.calls: List[Tuple] = []

    def names(self) -> List[str]:
        return [c[0] for c in self.calls]


class FakeEvent:
    def __init__(self, log: Log):
        self.log, self.id, self.t = log, len([c for c in log.calls if c[0] == "event"]), None
        log.calls.append(("event", self.id))

    def record(self):
        self.t = time.perf_counter()
        self.log.calls.append(("record", self.id))

    def synchronize(self):
        self.log.calls.append(("event.synchronize", self.id))

    def elapsed_time(self, end: "FakeEvent") -> float:
        if self.t is None or end.t is None:
            raise RuntimeError("elapsed_time on an event that was not recorded")
        self.log.calls.append(("elapsed_time", self.id, end.id))
        return (end.t - self.t) * 1e3


def event_timer(log: Log) -> CudaEventTimer:
    """CudaEventTimer on fake events; the device-wide synchronize is logged too."""
    return CudaEventTimer(event=lambda: FakeEvent(log),
                          synchronize=lambda: log.calls.append(("synchronize",)))


def do_bench_timer(log: Log) -> DoBenchTimer:
    """DoBenchTimer on a fake do_bench that calls fn three times and reports the CPU time of
    the last call in milliseconds."""
    def bench(fn, warmup, rep, return_mode):
        log.calls.append(("do_bench", warmup, rep, return_mode))
        for _ in range(3):
            start = time.perf_counter()
            fn()
        return (time.perf_counter() - start) * 1e3
    return DoBenchTimer(bench=bench, synchronize=lambda: log.calls.append(("synchronize",)))
