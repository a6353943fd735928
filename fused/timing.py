"""Timers and device checks shared by `fused.check` and the benchmarks.

A timer answers one question: how long does `fn()` take, called `calls` times in a row, once
the device has finished the work? On a CPU that is a wall clock around the calls. On a GPU
the calls only enqueue kernels, so a wall clock would time the launches: CUDA events are
recorded on the stream before and after the calls, the host waits for the end event, and the
elapsed time between the two events is the device time.

Both the check and the benchmarks take the timer as an argument instead of calling
`torch.cuda` themselves. That keeps the CUDA path testable on a machine without a GPU: the
tests hand `CudaEventTimer` fake events and a fake synchronize (and `DoBenchTimer` a fake
`do_bench`) and check what was recorded, on CPU tensors.

    timer_for("cpu")            -> CpuTimer()
    timer_for("cuda")           -> CudaEventTimer()   (interleaved benchmark samples)
    bench_timer_for("cuda")     -> DoBenchTimer()     (triton.testing.do_bench: warm-up, L2
                                                       flush between calls, median)
    require_device("cuda")      -> torch.device, or DeviceUnavailable naming what is missing
"""
from __future__ import annotations

import shutil
import statistics
import time
from typing import Callable, List, Optional, Protocol

import torch

DEVICES = ("cpu", "cuda")


class DeviceUnavailable(RuntimeError):
    """The requested device cannot run here; the message says what is missing."""


def cuda_missing() -> Optional[str]:
    """Why CUDA tensors cannot be used in this process, or None when they can."""
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        gpu = ("nvidia-smi finds a GPU, so install the CUDA build of the pinned torch "
               "(docs/gpu.md)") if _nvidia_smi() else "and nvidia-smi is not on PATH"
        return (f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None), "
                f"{gpu}")
    return (f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but sees no GPU "
            f"(torch.cuda.device_count() = {torch.cuda.device_count()}); check nvidia-smi, "
            f"the driver and CUDA_VISIBLE_DEVICES")


def _nvidia_smi() -> bool:
    return shutil.which("nvidia-smi") is not None


def require_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device if tensors can be made on it here, else DeviceUnavailable."""
    dev = torch.device(device)
    if dev.type not in DEVICES:
        raise DeviceUnavailable(f"device {str(device)!r} is not supported: choose one of "
                                f"{', '.join(DEVICES)}")
    if dev.type == "cuda":
        missing = cuda_missing()
        if missing:
            raise DeviceUnavailable(f"device cuda requested, but {missing}")
    return dev


def device_name(device: str | torch.device) -> str:
    """The GPU's name (torch.cuda.get_device_name) for a CUDA device, else the device type."""
    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type


class Timer(Protocol):
    """Seconds per call of `fn`, measured on the device that runs it."""

    device: str

    def seconds(self, fn: Callable[[], object], calls: int = 1) -> float:
        ...

    def synchronize(self) -> None:
        """Wait until the device has finished the work queued so far."""


class CpuTimer:
    device = "cpu"

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock

    def seconds(self, fn: Callable[[], object], calls: int = 1) -> float:
        start = self.clock()
        for _ in range(calls):
            fn()
        return (self.clock() - start) / calls

    def synchronize(self) -> None:
        pass  # CPU ops have finished when they return


class CudaEventTimer:
    """Device time between two CUDA events around `calls` calls. `event` and `synchronize`
    default to torch.cuda's; tests pass stand-ins."""

    device = "cuda"

    def __init__(self, event: Optional[Callable[[], object]] = None,
                 synchronize: Optional[Callable[[], None]] = None):
        self.event = event or (lambda: torch.cuda.Event(enable_timing=True))
        self.synchronize = synchronize or torch.cuda.synchronize

    def seconds(self, fn: Callable[[], object], calls: int = 1) -> float:
        # Work queued before the start event (a previous provider's kernels) must not be
        # charged to this one.
        self.synchronize()
        start, end = self.event(), self.event()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls


class DoBenchTimer:
    """triton.testing.do_bench: warm-up, the L2 cache flushed before every call, the median
    of CUDA-event times. `bench` defaults to it; tests pass a stand-in."""

    device = "cuda"

    def __init__(self, bench: Optional[Callable[..., float]] = None, warmup_ms: int = 25,
                 rep_ms: int = 100, synchronize: Optional[Callable[[], None]] = None):
        if bench is None:
            import triton.testing
            bench = triton.testing.do_bench
        self.bench, self.warmup_ms, self.rep_ms = bench, warmup_ms, rep_ms
        self.synchronize = synchronize or torch.cuda.synchronize

    def seconds(self, fn: Callable[[], object], calls: int = 1) -> float:
        ms = self.bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median")
        return ms / 1e3


class MedianCpuTimer(CpuTimer):
    """CPU counterpart of DoBenchTimer for the check's table: a warm-up call, then the median
    of `repeats` single calls."""

    def __init__(self, repeats: int = 5, clock: Callable[[], float] = time.perf_counter):
        super().__init__(clock)
        self.repeats = repeats

    def seconds(self, fn: Callable[[], object], calls: int = 1) -> float:
        fn()
        samples: List[float] = [super(MedianCpuTimer, self).seconds(fn)
                                for _ in range(self.repeats)]
        return statistics.median(samples)


def timer_for(device: str | torch.device) -> Timer:
    """The timer of interleaved benchmark samples on `device` (checked with require_device)."""
    return CudaEventTimer() if require_device(device).type == "cuda" else CpuTimer()


def bench_timer_for(device: str | torch.device) -> Timer:
    """The timer of one steady-state figure per kernel on `device` (fused.check's table)."""
    return DoBenchTimer() if require_device(device).type == "cuda" else MedianCpuTimer()
