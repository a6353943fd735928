"""The benchmarks' `--device cuda` path on a CPU machine: the suites' own builders and the
interleaving harness run with device="cpu" and a CUDA-event timer on fake events, and are
checked for structure (samples per variant, a synchronize before every sample, the compile
step synchronized); `--device cuda` itself is refused here with the reason."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import cases, common, harness
from tests.fake_cuda import Log, event_timer

ROOT = Path(__file__).resolve().parents[1]
SHAPE = cases.UnitShape("resnet20", 4, 4, 3, 1, 1, 6)


def test_interleaved_units_with_the_cuda_event_timer(monkeypatch):
    from benchmarks import test_units
    log = Log()
    timer = event_timer(log)
    syncs = []
    monkeypatch.setattr(cases, "compiled", lambda module: module)  # no inductor here
    case = test_units.UnitCase(SHAPE, "conv-bn-relu", "bn", "nchw", "fwdbwd", "fused")
    run = harness.Interleaved(rounds=3, timer=timer)
    variants = ["fused/fwdbwd", "compile/fwdbwd", "eager/fwdbwd", "conv+relu/fwdbwd"]
    run.wanted[case.key] |= set(variants)
    build = test_units._build(case, "cpu", lambda: syncs.append(1))
    timings = run.measure(case.key, [], build)
    assert set(timings) == set(variants)
    for timing in timings.values():
        assert len(timing.samples) == 3 and timing.inner >= 1
        assert all(s >= 0 for s in timing.samples)
    assert syncs == [1]      # the compile provider's first step is waited for
    names = log.names()
    # calibration (one per variant) + rounds × variants samples, each opened by a
    # device-wide synchronize and closed by waiting for its end event
    samples = len(variants) * (1 + 3)
    assert names.count("synchronize") == samples
    assert names.count("event.synchronize") == samples == names.count("elapsed_time")
    for i, name in enumerate(names):
        if name == "record" and names[i - 1] == "event":
            assert names[i - 3] == "synchronize"


def test_network_step_and_memory_on_a_given_device(monkeypatch):
    syncs = []
    monkeypatch.setattr(cases, "compiled", lambda module: module)
    step, compile_s = cases.network_step("resnet20", "bn-conv-relu", "bn", "compile", batch=2,
                                         device="cpu", sync=lambda: syncs.append(1))
    assert syncs == [1] and compile_s >= 0
    step()
    x, target = cases.network_batch("resnet20", 2, device="cpu")
    assert x.device.type == target.device.type == "cpu"
    memory = cases.unit_memory(SHAPE, "conv-bn-relu", "bn", "fused", batch=2, device="cpu")
    assert memory["saved_bytes"] > 0 and memory["peak_bytes"] > 0


def test_copy_bandwidth_and_cache_of_a_cuda_device_use_the_injected_pieces(monkeypatch):
    log = Log()
    timer = event_timer(log)
    monkeypatch.setattr(common, "_copy_bandwidth", {})   # measured afresh with this timer
    bw = common.copy_bandwidth(1 << 20, device="cpu", timer=timer)
    assert bw > 0 and log.names().count("elapsed_time") == 5

    class Props:
        L2_cache_size = 50 << 20

    asked = []
    assert common.cache_bytes("cuda", properties=lambda d: (asked.append(d), Props)[1]) \
        == 50 << 20
    assert asked == ["cuda"]


def test_machine_info_of_a_cuda_device(monkeypatch):
    from benchmarks import conftest

    class Props:
        L2_cache_size = 40 << 20

    monkeypatch.setattr(common, "copy_bandwidth", lambda device, timer: 2e12)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    info = conftest.machine_of("cuda", event_timer(Log()))
    assert info == dict(copy_bandwidth=2e12, cache_bytes=40 << 20,
                        threads=torch.get_num_threads(), device="cuda",
                        device_name="NVIDIA A100")
    timing = harness.Timing([1e-3, 2e-3, 3e-3], 1)
    extra = harness.timing_info(timing, timing, 4_000_000, 1 << 20, info, "nchw")
    assert extra["device"] == "cuda" and extra["gbps"] == pytest.approx(2.0)
    assert extra["fits_in_cache"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_bench_refuses_device_cuda_without_a_gpu():
    env = {**os.environ, **common.ALLOCATOR_ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "--quick",
         "--collect-only", "-q", "-p", "no:cacheprovider", "--device", "cuda"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, out[-2000:]
    assert "--device: device cuda requested, but" in out
    assert "collected" not in out
