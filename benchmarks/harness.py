"""The glue between benchmarks.cases/common and pytest-benchmark.

Interleaving (DESIGN §7). pytest-benchmark times one test after another, so providers timed
by separate tests would see different machine states. Here every test of a provider is one
*variant* of a *case* (a unit shape × order × norm × format, or a network × order): the first
test of a case times all of the case's collected variants together with
`common.time_interleaved` (variants take turns inside every round, warm-up excluded), and
each test then hands its own variant's samples to pytest-benchmark. Medians and the ratios
to eager in extra_info therefore come from one interleaved run. Tests of a case are
collected next to each other, so only one case's modules are alive at a time.

Device: `--device cuda` hands the case a CUDA-event timer (fused.timing) that synchronizes
before each sample and waits for the end event, so that the samples count the kernels and
not their launches; calibration uses the same timer.

pytest-benchmark's own calibration options (--benchmark-min-rounds, ...) do not apply to
these tests; --bench-rounds sets the rounds.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Tuple

from benchmarks import common
from fused.timing import CpuTimer, Timer

# Each sample is the mean of enough calls to last about this long (timer noise, OS ticks).
SAMPLE_SECONDS = 0.05
MAX_INNER = 20


@dataclass
class Timing:
    samples: List[float]
    inner: int
    compile_s: float | None = None
    load: Tuple[float, float] = (0.0, 0.0)      # 1-minute load average before and after

    @property
    def median(self) -> float:
        return common.median(self.samples)


@dataclass
class Interleaved:
    """One interleaved measurement per case key, shared by the tests of its variants."""
    rounds: int
    timer: Timer = field(default_factory=CpuTimer)
    wanted: Dict[tuple, set] = field(default_factory=lambda: defaultdict(set))
    _key: tuple | None = None
    _timings: Dict[str, Timing] = field(default_factory=dict)

    def measure(self, key: tuple, required: Iterable[str],
                build: Callable[[set], Tuple[Dict[str, Callable], Dict[str, float]]]
                ) -> Dict[str, Timing]:
        """Timings of the collected variants of `key` plus `required` (the references the
        ratios need); `build(variants)` returns ({variant: fn}, {variant: compile seconds})."""
        if key != self._key:
            self._key, self._timings = None, {}
            variants = self.wanted[key] | set(required)
            fns, compile_s = build(variants)
            load0 = os.getloadavg()[0]
            inner = calibrate(fns, self.timer)
            samples = common.time_interleaved(fns, rounds=self.rounds, inner=inner, warmup=1,
                                              timer=self.timer)
            load = (load0, os.getloadavg()[0])
            self._timings = {v: Timing(s, inner, compile_s.get(v), load)
                             for v, s in samples.items()}
            self._key = key
        return self._timings


def calibrate(fns: Dict[str, Callable], timer: Timer | None = None) -> int:
    """Calls per sample: one warm-up call of every fn, timed; enough calls of the median fn
    to fill SAMPLE_SECONDS."""
    timer = timer or CpuTimer()
    times = [timer.seconds(fn) for fn in fns.values()]
    typical = sorted(times)[len(times) // 2]
    return max(1, min(MAX_INNER, math.ceil(SAMPLE_SECONDS / max(typical, 1e-9))))


def record(benchmark, timing: Timing, extra: Dict) -> None:
    """Give pytest-benchmark the samples timed in the interleaved run. It has no public entry
    for samples timed elsewhere, so this uses its stats object the way pedantic() does."""
    benchmark.extra_info.update(extra)
    benchmark._mode = "interleaved (benchmarks.harness.record)"
    if benchmark.disabled:
        return
    stats = benchmark._make_stats(timing.inner)
    for s in timing.samples:
        stats.update(s * timing.inner)


def timing_info(timing: Timing, eager: Timing, moved: int, working_set: int,
                machine: Dict, fmt: str, baseline: Timing | None = None) -> Dict:
    """The extra_info every timed benchmark carries (DESIGN §7)."""
    med = timing.median
    info = dict(
        median_s=med, rounds=len(timing.samples), calls_per_round=timing.inner,
        memory_format=fmt, bytes_moved=moved, gbps=moved / med / 1e9,
        copy_bandwidth_gbps=machine["copy_bandwidth"] / 1e9,
        fraction_of_copy_bandwidth=moved / med / machine["copy_bandwidth"],
        working_set_bytes=working_set, cache_bytes=machine["cache_bytes"],
        fits_in_cache=working_set <= machine["cache_bytes"],
        ratio_to_eager=med / eager.median, speedup_vs_eager=eager.median / med,
        threads=machine["threads"], load_avg=list(timing.load),
        device=machine.get("device", "cpu"),
    )
    if timing.compile_s is not None:
        info["compile_s"] = timing.compile_s
    if baseline is not None:
        info["bn_tax"] = med / baseline.median - 1
    return info
