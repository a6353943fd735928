"""fused.timing: the CUDA-event and do_bench timers run here on fake events (tests/fake_cuda.py)
and are checked for what they record and in which order; the device checks name what is
missing. Nothing here asserts an elapsed time."""
import pytest
import torch

from fused import timing
from tests.fake_cuda import FakeEvent, Log, do_bench_timer, event_timer

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(),
                                   reason="checks the refusal on a machine without CUDA")


def test_cuda_event_timer_brackets_the_calls_and_waits_for_the_end_event():
    log = Log()
    calls = []
    timer = event_timer(log)
    seconds = timer.seconds(lambda: (calls.append(1), log.calls.append(("fn",))), calls=3)
    assert log.names() == ["synchronize", "event", "event", "record", "fn", "fn", "fn",
                           "record", "event.synchronize", "elapsed_time"]
    start, end = log.calls[3][1], log.calls[7][1]
    assert (start, end) == (0, 1) and log.calls[-1] == ("elapsed_time", 0, 1)
    assert len(calls) == 3 and seconds >= 0


def test_cuda_event_timer_reports_seconds_per_call():
    """elapsed_time is in milliseconds for all the calls; seconds() divides by both."""
    class FixedEvent:
        def record(self):
            pass

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return 8.0

    timer = timing.CudaEventTimer(event=FixedEvent, synchronize=lambda: None)
    assert timer.seconds(lambda: None, calls=4) == pytest.approx(8.0 / 1e3 / 4)


def test_do_bench_timer_asks_for_the_median_and_converts_to_seconds():
    log = Log()
    timer = timing.DoBenchTimer(bench=lambda fn, warmup, rep, return_mode: (
        log.calls.append((warmup, rep, return_mode)), 2.5)[1], warmup_ms=5, rep_ms=7)
    assert timer.seconds(lambda: None) == pytest.approx(2.5e-3)
    assert log.calls == [(5, 7, "median")]
    ran = []
    fake = do_bench_timer(Log())
    fake.seconds(lambda: ran.append(1))
    assert ran == [1, 1, 1]


def test_cpu_timers_call_fn_the_stated_number_of_times():
    ticks = iter(range(100))
    calls = []
    assert timing.CpuTimer(clock=lambda: next(ticks)).seconds(lambda: calls.append(1), 4) \
        == pytest.approx(1 / 4)
    assert len(calls) == 4
    calls.clear()
    median = timing.MedianCpuTimer(repeats=5, clock=lambda: next(ticks))
    assert median.seconds(lambda: calls.append(1)) == 1
    assert len(calls) == 6   # one warm-up call, then five timed ones


def test_timer_for_cpu_and_bad_devices():
    assert isinstance(timing.timer_for("cpu"), timing.CpuTimer)
    assert isinstance(timing.bench_timer_for("cpu"), timing.MedianCpuTimer)
    assert timing.require_device("cpu") == torch.device("cpu")
    with pytest.raises(timing.DeviceUnavailable, match="not supported"):
        timing.require_device("meta")
    with pytest.raises(RuntimeError):
        timing.require_device("not-a-device")


@needs_no_cuda
def test_cuda_refused_here_naming_what_is_missing():
    with pytest.raises(timing.DeviceUnavailable) as err:
        timing.timer_for("cuda")
    message = str(err.value)
    assert "device cuda requested" in message
    if torch.version.cuda is None:
        assert "CPU-only build" in message and torch.__version__ in message


def test_cuda_missing_names_each_cause(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(timing, "_nvidia_smi", lambda: True)
    assert "nvidia-smi finds a GPU" in timing.cuda_missing()
    assert "CUDA build" in timing.cuda_missing()
    monkeypatch.setattr(timing, "_nvidia_smi", lambda: False)
    assert "nvidia-smi is not on PATH" in timing.cuda_missing()
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    text = timing.cuda_missing()
    assert "CUDA 12.8" in text and "sees no GPU" in text and "CUDA_VISIBLE_DEVICES" in text


def test_cuda_timers_chosen_when_cuda_is_usable(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert timing.cuda_missing() is None
    assert isinstance(timing.timer_for("cuda"), timing.CudaEventTimer)
    assert isinstance(timing.bench_timer_for("cuda:0"), timing.DoBenchTimer)


def test_default_cuda_pieces_are_torch_cudas(monkeypatch):
    """Without stand-ins the event timer makes torch.cuda.Event(enable_timing=True) and
    synchronizes with torch.cuda.synchronize; device_name asks torch.cuda for the GPU."""
    log = Log()

    class Event(FakeEvent):
        def __init__(self, enable_timing=False):
            assert enable_timing
            super().__init__(log)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: log.calls.append(("synchronize",)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert timing.CudaEventTimer().seconds(lambda: None) >= 0
    assert log.names()[:4] == ["synchronize", "event", "event", "record"]
    assert timing.device_name("cuda:0") == "NVIDIA H100 PCIe"
    assert timing.device_name("cpu") == "cpu"
