"""pytest-benchmark suites: `pytest benchmarks/ --benchmark-only [--quick]` (`make bench`).

    test_units.py     one unit per shape × order × norm × mode, eager / fused / compile
    test_networks.py  training steps of alexnet, vgg16, resnet20, every order, plus norm none
    test_memory.py    saved-for-backward and peak bytes, eager vs fused

Device: `--device cuda` puts every module and tensor on the GPU and times with CUDA events
(fused.timing.CudaEventTimer); on a machine where CUDA cannot run it stops before collecting,
naming what is missing. Default `cpu`.

Allocator: glibc reads its malloc settings at start-up only, so a run without
common.ALLOCATOR_ENV re-executes itself with them (or, when pytest was started from inside
another program, stops and says how to run). How providers are interleaved:
benchmarks/harness.py.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from benchmarks import common
from benchmarks.harness import Interleaved
from fused import timing

RERUN_FLAG = "BNORDER_BENCH_REEXEC"


def pytest_addoption(parser):
    group = parser.getgroup("bnorder benchmarks")
    group.addoption("--quick", action="store_true",
                    help="smoke run: one small shape, one order, two rounds (make test)")
    group.addoption("--wide", action="store_true",
                    help="every norm at every unit shape and both memory formats (slow)")
    group.addoption("--bench-rounds", type=int, default=None,
                    help="interleaved rounds per case (default 5, --quick 2)")
    group.addoption("--device", choices=timing.DEVICES, default="cpu",
                    help="where modules and tensors live and how samples are timed: cpu "
                         "(wall clock, default) or cuda (CUDA events, synchronized)")


def pytest_configure(config):
    try:
        timing.require_device(config.getoption("--device"))
    except timing.DeviceUnavailable as e:
        raise pytest.UsageError(f"--device: {e}") from None
    if common.allocator_env_active():
        return
    started_here = tuple(config.invocation_params.args) == tuple(sys.argv[1:])
    if started_here and not os.environ.get(RERUN_FLAG):
        env = {**os.environ, **common.ALLOCATOR_ENV, RERUN_FLAG: "1"}
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", "pytest", *sys.argv[1:]], env)
    settings = " ".join(f"{k}={v}" for k, v in common.ALLOCATOR_ENV.items())
    raise pytest.UsageError(
        f"the benchmarks need the same malloc settings for every provider (DESIGN §8), and "
        f"glibc reads them at start-up only: run `make bench`, or `env {settings} "
        f"python -m pytest benchmarks/ --benchmark-only`")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Note which variants of each case survived -k/-m, so a case's interleaved run times
    those (and its references) only."""
    interleaved = _interleaved(config)
    for item in items:
        case = getattr(item, "callspec", None) and item.callspec.params.get("case")
        if case is not None and hasattr(case, "variant"):
            interleaved.wanted[case.key].add(case.variant)


def _interleaved(config) -> Interleaved:
    if not hasattr(config, "_bnorder_interleaved"):
        rounds = config.getoption("--bench-rounds") or (2 if config.getoption("--quick")
                                                        else 5)
        config._bnorder_interleaved = Interleaved(
            rounds, timing.timer_for(config.getoption("--device")))
    return config._bnorder_interleaved


@pytest.fixture(scope="package")
def interleaved(pytestconfig) -> Interleaved:
    return _interleaved(pytestconfig)


@pytest.fixture(scope="package")
def device(pytestconfig) -> str:
    """The --device every case builds its modules and tensors on."""
    return pytestconfig.getoption("--device")


def machine_of(device: str, timer: timing.Timer) -> dict:
    """Copy bandwidth (measured with the suite's timer), largest cache, threads, device."""
    info = dict(copy_bandwidth=common.copy_bandwidth(device=device, timer=timer),
                cache_bytes=common.cache_bytes(device), threads=torch.get_num_threads(),
                device=device)
    if device == "cuda":
        info["device_name"] = timing.device_name(device)
    return info


@pytest.fixture(scope="package")
def machine(pytestconfig, device) -> dict:
    """Measured once per run (every suite lives in this package)."""
    return machine_of(device, _interleaved(pytestconfig).timer)


def pytest_benchmark_update_machine_info(config, machine_info):
    device = config.getoption("--device")
    info = machine_of(device, _interleaved(config).timer)
    machine_info["bnorder"] = dict(
        copy_bandwidth_gbps=info["copy_bandwidth"] / 1e9, cache_bytes=info["cache_bytes"],
        threads=info["threads"], device=device, device_name=info.get("device_name"),
        torch=torch.__version__, allocator_env=common.ALLOCATOR_ENV,
        quick=config.getoption("--quick"), load_avg=list(os.getloadavg()))
