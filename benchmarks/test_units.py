"""One unit at the layer shapes of alexnet, vgg16 and resnet20 (batch 128, fp32): the
training forward (`fwd`) and forward + backward (`fwdbwd`), eager / fused / torch.compile,
timed interleaved with the unit's conv+relu floor (the same unit with an empty norm slot).

extra_info: bytes moved (DESIGN §4 model, benchmarks.cases.unit_bytes), GB/s, copy
bandwidth, memory format, working set vs cache, ratio to eager, `bn_tax` = time / conv+relu
time − 1 (both from the same interleaved run), compile_s for torch.compile.
"""
from __future__ import annotations

from dataclasses import dataclass


from benchmarks import cases, harness
from benchmarks.cases import FLOOR, UnitShape

MODES = ("fwd", "fwdbwd")


@dataclass(frozen=True)
class UnitCase:
    shape: UnitShape
    order: str
    norm: str
    fmt: str
    mode: str
    provider: str

    @property
    def key(self) -> tuple:
        return ("unit", self.shape, self.order, self.norm, self.fmt)

    @property
    def variant(self) -> str:
        return f"{self.provider}/{self.mode}"

    @property
    def id(self) -> str:
        return f"{self.shape.label}-{self.order}-{self.norm}-{self.fmt}-{self.mode}-{self.provider}"


def pytest_generate_tests(metafunc):
    quick, wide = metafunc.config.getoption("--quick"), metafunc.config.getoption("--wide")
    all_cases = [UnitCase(shape, order, norm, fmt, mode, provider)
                 for shape, order, norm, fmt in cases.unit_configs(quick, wide)
                 for mode in MODES
                 # torch.compile costs ~5-15 s per case: norm bn only
                 for provider in cases.PROVIDERS if provider != "compile" or norm == "bn"]
    metafunc.parametrize("case", all_cases, ids=[c.id for c in all_cases])


def _build(case: UnitCase, device: str, sync):
    def build(variants):
        fns, compile_s = {}, {}
        for provider in (FLOOR, *cases.PROVIDERS):
            modes = [m for m in MODES if f"{provider}/{m}" in variants]
            if not modes:
                continue
            steps, seconds = cases.unit_steps(case.shape, case.order, case.norm, provider,
                                              case.fmt, modes, device=device, sync=sync)
            for mode, step in steps.items():
                fns[f"{provider}/{mode}"] = step
                if seconds is not None:
                    compile_s[f"{provider}/{mode}"] = seconds
        return fns, compile_s
    return build


def test_unit(benchmark, case, interleaved, machine, device):
    modes = {v.split("/")[1] for v in interleaved.wanted[case.key]} | {case.mode}
    required = [f"{p}/{m}" for m in modes for p in ("eager", FLOOR)]
    timings = interleaved.measure(case.key, required,
                                  _build(case, device, interleaved.timer.synchronize))
    timing = timings[case.variant]
    extra = dict(suite="unit", network=case.shape.net, shape=case.shape.label,
                 order=case.order, norm=case.norm, mode=case.mode, provider=case.provider,
                 batch=cases.BATCH)
    extra.update(harness.timing_info(
        timing, timings[f"eager/{case.mode}"],
        cases.unit_bytes(case.shape, case.order, case.norm, case.provider, case.mode),
        cases.unit_working_set(case.shape, case.mode), machine, case.fmt,
        baseline=timings[f"{FLOOR}/{case.mode}"]))
    extra["floor_median_s"] = timings[f"{FLOOR}/{case.mode}"].median
    benchmark.group = (f"unit {case.shape.label} {case.order} {case.norm} {case.fmt} "
                       f"{case.mode}")
    harness.record(benchmark, timing, extra)
    assert timing.median > 0
