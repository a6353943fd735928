"""Timing conventions shared by every benchmark (DESIGN §7, §8).

* Same allocator settings for every provider: glibc malloc is told to keep freed memory
  (no mmap/trim churn), since page faults on large fresh tensors change CPU step times by
  10–15 %. `ensure_allocator_env()` re-executes the process with the settings when they
  are missing, because glibc reads them only at start-up.
* Providers are interleaved round by round, so drift of a noisy machine cancels; warm-up is
  excluded; medians are reported, and ratios between providers of the same run.
* Every sample is taken by a `fused.timing` timer: a wall clock on CPU, CUDA events with a
  synchronization on GPU (`--device cuda`), so that queued kernels are counted.
"""
from __future__ import annotations

import os
import statistics
import sys
from typing import Callable, Dict, List

import torch

from fused.timing import CpuTimer, Timer

ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 34),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 34),
    "MALLOC_TOP_PAD_": str(1 << 30),
}


def allocator_env_active() -> bool:
    return all(os.environ.get(k) == v for k, v in ALLOCATOR_ENV.items())


def ensure_allocator_env(module: str) -> None:
    """Re-run `python -m module argv...` with ALLOCATOR_ENV unless it is already active."""
    if allocator_env_active():
        return
    env = {**os.environ, **ALLOCATOR_ENV}
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


def time_interleaved(fns: Dict[str, Callable[[], object]], rounds: int = 7, inner: int = 3,
                     warmup: int = 2, progress: Callable[[int], None] | None = None,
                     timer: Timer | None = None) -> Dict[str, List[float]]:
    """Seconds per call of each fn: `rounds` samples, each the mean of `inner` calls, with
    the providers taking turns inside every round; `timer` takes the samples (default: the
    CPU wall clock)."""
    timer = timer or CpuTimer()
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            samples[name].append(timer.seconds(fn, inner))
        if progress:
            progress(r + 1)
    return samples


def median(xs: List[float]) -> float:
    return statistics.median(xs)


_copy_bandwidth: Dict[str, float] = {}


def copy_bandwidth(nbytes: int = 256 << 20, device: str = "cpu",
                   timer: Timer | None = None) -> float:
    """The device's copy bandwidth in bytes/s (read + write counted), measured once per
    process and device with torch's own copy on a tensor far larger than the caches."""
    if device not in _copy_bandwidth:
        timer = timer or CpuTimer()
        src = torch.ones(nbytes // 4, device=device)
        dst = torch.empty_like(src)
        dst.copy_(src)
        best = min(timer.seconds(lambda: dst.copy_(src)) for _ in range(5))
        _copy_bandwidth[device] = 2 * nbytes / best
    return _copy_bandwidth[device]


def cache_bytes(device: str = "cpu", properties: Callable[[str], object] | None = None
                ) -> int:
    """Largest cache level of the device (bytes; a GPU's L2), 0 when unknown.
    `properties` defaults to torch.cuda.get_device_properties."""
    if torch.device(device).type == "cuda":
        props = (properties or torch.cuda.get_device_properties)(device)
        return int(getattr(props, "L2_cache_size", 0))
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            path = os.path.join(base, entry, "size")
            if os.path.exists(path):
                text = open(path).read().strip()
                mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
                best = max(best, int(text.rstrip("KMG")) * mult)
    except OSError:
        return 0
    return best
