"""Stand-ins for the CUDA runtime pieces that fused.timing injects, so that the CUDA code paths
of the check and the benchmarks run on a CPU machine. They record what was called, in order;
no clock is read: an event pair reports 1 ms per call logged between their record() calls, and
the fake do_bench 1 ms, so that nothing a test checks depends on how fast the machine is."""
from __future__ import annotations

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
        self.log.calls.append(("record", self.id))
        self.t = len(self.log.calls)

    def synchronize(self):
        self.log.calls.append(("event.synchronize", self.id))

    def elapsed_time(self, end: "FakeEvent") -> float:
        if self.t is None or end.t is None:
            raise RuntimeError("elapsed_time on an event that was not recorded")
        self.log.calls.append(("elapsed_time", self.id, end.id))
        return float(end.t - self.t)


def event_timer(log: Log) -> CudaEventTimer:
    """CudaEventTimer on fake events; the device-wide synchronize is logged too."""
    return CudaEventTimer(event=lambda: FakeEvent(log),
                          synchronize=lambda: log.calls.append(("synchronize",)))


def do_bench_timer(log: Log) -> DoBenchTimer:
    """DoBenchTimer on a fake do_bench that calls fn three times and reports 1 ms."""
    def bench(fn, warmup, rep, return_mode):
        log.calls.append(("do_bench", warmup, rep, return_mode))
        for _ in range(3):
            fn()
        return 1.0
    return DoBenchTimer(bench=bench, synchronize=lambda: log.calls.append(("synchronize",)))
