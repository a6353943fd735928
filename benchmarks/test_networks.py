"""One training step (forward, cross-entropy, backward, momentum SGD) of alexnet, vgg16 and
resnet20 at batch 128, fp32, in every order: eager / fused / torch.compile of the eager model /
torch.compile of the fused model (`compile-fused`) with norm bn, interleaved with the same
network with norm `none` (the reference of the BN tax). Every
network runs in NCHW; resnet20 also in channels_last (`nhwc`), model and input converted for
every provider alike: oneDNN's convolutions are faster there, and torch.compile's layout
optimization picks it by itself even for NCHW input, so the NCHW rows alone would credit
compile with a layout change rather than with fusion.

extra_info: `bn_tax` = step time / none step time − 1 (DESIGN §7's headline), ratio to eager,
bytes moved (benchmarks.cases.network_bytes), GB/s, compile_s for torch.compile.
"""
from __future__ import annotations

from dataclasses import dataclass


from benchmarks import cases, harness

# variants with norm none: the BN-tax reference of eager and fused; torch.compile's is the
# compiled network with norm none, timed under --wide only (a compile costs 20-60 s)
NONE = {"eager": "none", "compile": "none-compile"}


@dataclass(frozen=True)
class NetworkCase:
    network: str
    order: str
    norm: str
    provider: str
    batch: int
    fmt: str

    @property
    def key(self) -> tuple:
        return ("network", self.network, self.order, self.batch, self.fmt)

    @property
    def variant(self) -> str:
        return self.provider if self.norm != "none" else NONE[self.provider]

    @property
    def id(self) -> str:
        return f"{self.network}-{self.order}-{self.fmt}-{self.norm}-{self.provider}"


def pytest_generate_tests(metafunc):
    quick, wide = metafunc.config.getoption("--quick"), metafunc.config.getoption("--wide")
    providers = ("eager", "fused") if quick else cases.NETWORK_PROVIDERS
    all_cases = []
    for net, order, batch, fmt in cases.network_configs(quick):
        all_cases += [NetworkCase(net, order, "bn", p, batch, fmt) for p in providers]
        # fused and eager run the same code with an empty slot: one `none` reference
        all_cases += [NetworkCase(net, order, "none", p, batch, fmt)
                      for p in (("eager", "compile") if wide else ("eager",))]
    metafunc.parametrize("case", all_cases, ids=[c.id for c in all_cases])


def _build(case: NetworkCase, device: str, sync):
    def build(variants):
        fns, compile_s = {}, {}
        for norm, provider in [*(("none", p) for p in NONE),
                               *(("bn", p) for p in cases.NETWORK_PROVIDERS)]:
            variant = NetworkCase(case.network, case.order, norm, provider, case.batch,
                                  case.fmt).variant
            if variant not in variants:
                continue
            fns[variant], seconds = cases.network_step(case.network, case.order, norm,
                                                       provider, case.batch, case.fmt,
                                                       device, sync)
            if seconds is not None:
                compile_s[variant] = seconds
        return fns, compile_s
    return build


def test_network_step(benchmark, case, interleaved, machine, device):
    timings = interleaved.measure(case.key, ["eager", "none"],
                                  _build(case, device, interleaved.timer.synchronize))
    timing = timings[case.variant]
    moved, working_set = cases.network_bytes(case.network, case.order, case.norm,
                                             case.provider, case.batch)
    extra = dict(suite="network", network=case.network, order=case.order, norm=case.norm,
                 provider=case.provider, variant=case.variant, batch=case.batch)
    reference = NONE["compile"] if case.provider.startswith("compile") else NONE["eager"]
    extra.update(harness.timing_info(timing, timings["eager"], moved, working_set, machine,
                                     case.fmt, timings.get(reference) if case.norm == "bn"
                                     else None))
    benchmark.group = f"network {case.network} {case.order}"
    harness.record(benchmark, timing, extra)
    assert timing.median > 0
