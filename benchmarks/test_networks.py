"""One training step (forward, cross-entropy, backward, momentum SGD) of alexnet, vgg16 and
resnet20 at batch 128, fp32, NCHW, in every order: eager / fused / torch.compile with norm
bn, interleaved with the same network with norm `none` (the reference of the BN tax).

extra_info: `bn_tax` = step time / none step time − 1 (DESIGN §7's headline), ratio to eager,
bytes moved (benchmarks.cases.network_bytes), GB/s, compile_s for torch.compile.
"""
from __future__ import annotations

from dataclasses import dataclass


from benchmarks import cases, harness

FMT = "nchw"


@dataclass(frozen=True)
class NetworkCase:
    network: str
    order: str
    norm: str
    provider: str
    batch: int

    @property
    def key(self) -> tuple:
        return ("network", self.network, self.order, self.batch)

    @property
    def variant(self) -> str:
        return "none" if self.norm == "none" else self.provider

    @property
    def id(self) -> str:
        return f"{self.network}-{self.order}-{self.norm}-{self.provider}"


def pytest_generate_tests(metafunc):
    quick = metafunc.config.getoption("--quick")
    providers = ("eager", "fused") if quick else cases.PROVIDERS
    all_cases = []
    for net, order, batch in cases.network_configs(quick):
        all_cases += [NetworkCase(net, order, "bn", p, batch) for p in providers]
        # fused and eager run the same code with an empty slot: one `none` reference
        all_cases.append(NetworkCase(net, order, "none", "eager", batch))
    metafunc.parametrize("case", all_cases, ids=[c.id for c in all_cases])


def _build(case: NetworkCase):
    def build(variants):
        fns, compile_s = {}, {}
        for variant in ("none", *cases.PROVIDERS):
            if variant not in variants:
                continue
            norm, provider = ("none", "eager") if variant == "none" else ("bn", variant)
            fns[variant], seconds = cases.network_step(case.network, case.order, norm,
                                                       provider, case.batch, FMT)
            if seconds is not None:
                compile_s[variant] = seconds
        return fns, compile_s
    return build


def test_network_step(benchmark, case, interleaved, machine):
    timings = interleaved.measure(case.key, ["eager", "none"], _build(case))
    timing = timings[case.variant]
    moved, working_set = cases.network_bytes(case.network, case.order, case.norm,
                                             case.provider, case.batch)
    extra = dict(suite="network", network=case.network, order=case.order, norm=case.norm,
                 provider=case.provider, batch=case.batch)
    extra.update(harness.timing_info(timing, timings["eager"], moved, working_set, machine,
                                     FMT, baseline=timings["none"]))
    benchmark.group = f"network {case.network} {case.order}"
    harness.record(benchmark, timing, extra)
    assert timing.median > 0
