"""bnorder's performance targets: one table, read by the benchmark report (`make bench`) and
the step profile (`make profile`), which mark each target ✓ or ✗ with its measured figure.

Each target names the figure it sets, the measurement that checks it and why it is set
where it is. A target holds for a run when every cell of the run it applies to (a network ×
order × layout, or a unit / network × order for the memory targets) meets it; the report
quotes the worst cell. A run that has no cell for a target says so ("not measured") rather
than passing it.

The quantities:

    fused_bn_tax           fused step / step of the same network with norm none − 1
    eager_over_fused       eager step / fused step (≥ 1: fused is at least as fast)
    compile_over_compiled_fused
                           torch.compile(eager model) step / torch.compile(fused model) step
    saved_cut              1 − fused saved-for-backward bytes / eager's
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

NETWORKS_SUITE = ("networks suite, benchmarks/test_networks.py (make bench); ResNet-20 also "
                  "make profile")
MEMORY_SUITE = "memory suite, benchmarks/test_memory.py (make bench)"


@dataclass(frozen=True)
class Target:
    name: str
    figure: str                 # the target as a reader states it
    metric: str                 # a key of METRICS
    bound: float
    at_least: bool              # True: measured ≥ bound holds; False: measured ≤ bound holds
    measurement: str            # what measures it
    rationale: str
    where: Dict[str, str] = field(default_factory=dict)   # the cells it applies to

    def holds(self, value: float) -> bool:
        if value is None or not math.isfinite(value):
            return False
        return value >= self.bound if self.at_least else value <= self.bound

    def show(self, value: Optional[float]) -> str:
        return "–" if value is None else METRICS[self.metric].show(value)

    def applies(self, cell: Dict) -> bool:
        return all(cell.get(k) == v for k, v in self.where.items())


TARGETS: Tuple[Target, ...] = (
    Target("bn-tax-resnet20", "fused BN tax ≤ 10 % on ResNet-20, every order and layout",
           "fused_bn_tax", 0.10, False, NETWORKS_SUITE,
           "eager PyTorch pays 28–31 % here; ResNet-20's convolutions are small, so BN's "
           "passes over memory weigh more than in the larger networks",
           where={"network": "resnet20"}),
    Target("bn-tax-vgg16", "fused BN tax ≤ 3 % on VGG-16, every order and layout",
           "fused_bn_tax", 0.03, False, NETWORKS_SUITE,
           "VGG-16's convolutions dominate its step; a BN at memory bandwidth costs a few "
           "per cent of it", where={"network": "vgg16"}),
    Target("bn-tax-alexnet", "fused BN tax ≤ 3 % on AlexNet, every order and layout",
           "fused_bn_tax", 0.03, False, NETWORKS_SUITE,
           "as for VGG-16: large convolutions, few BN layers", where={"network": "alexnet"}),
    Target("fused-vs-eager", "fused step ≥ eager step (speed-up ≥ 1.00×) in every cell",
           "eager_over_fused", 1.0, True, NETWORKS_SUITE,
           "the fused backend must never make a network slower than plain PyTorch"),
    Target("compile-fused-vs-compile",
           "torch.compile of the fused model ≥ torch.compile of the eager model (≥ 1.00×)",
           "compile_over_compiled_fused", 1.0, True, NETWORKS_SUITE,
           "the fused ops must not stop inductor from fusing the rest of the network"),
    Target("saved-bytes-bn-conv-relu",
           "bn-conv-relu saves ≥ 30 % fewer bytes for backward than eager",
           "saved_cut", 0.30, True, MEMORY_SUITE,
           "norm(x) is never stored: the convolution takes x and the folded weights",
           where={"order": "bn-conv-relu"}),
    Target("saved-bytes-never-above-eager",
           "no order saves more activation bytes for backward than eager",
           "saved_cut", 0.0, True, MEMORY_SUITE,
           "fusion recomputes the ReLU mask and the normalized tensor instead of storing them"),
)

BY_NAME: Dict[str, Target] = {t.name: t for t in TARGETS}


def _pct(x: float) -> str:
    return f"{100 * x:+.1f} %"


def _times(x: float) -> str:
    return f"{x:.2f}×"


@dataclass(frozen=True)
class Metric:
    cells: Callable[["Measured"], List[Dict]]   # [{...labels, "value": v}]
    show: Callable[[float], str]


@dataclass
class Measured:
    """What one run measured, in the form the targets read: training-step medians per
    (network, order, format, batch) and variant, and saved bytes per memory case."""
    steps: Dict[tuple, Dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    saved: Dict[tuple, Dict[str, int]] = field(default_factory=lambda: defaultdict(dict))

    STEP_KEYS = ("network", "order", "format", "batch")
    SAVED_KEYS = ("kind", "what", "order", "norm", "batch")


def _ratio_cells(measured: Measured, top: str, bottom: str, minus_one: bool = False):
    cells = []
    for key, med in measured.steps.items():
        if top in med and bottom in med:
            value = med[top] / med[bottom] - (1 if minus_one else 0)
            cells.append(dict(zip(Measured.STEP_KEYS, key), value=value))
    return cells


def _saved_cells(measured: Measured):
    return [dict(zip(Measured.SAVED_KEYS, key), value=1 - b["fused"] / b["eager"])
            for key, b in measured.saved.items() if {"eager", "fused"} <= set(b)]


METRICS: Dict[str, Metric] = {
    "fused_bn_tax": Metric(lambda m: _ratio_cells(m, "fused", "none", minus_one=True), _pct),
    "eager_over_fused": Metric(lambda m: _ratio_cells(m, "eager", "fused"), _times),
    "compile_over_compiled_fused": Metric(
        lambda m: _ratio_cells(m, "compile", "compile-fused"), _times),
    "saved_cut": Metric(_saved_cells, _pct),
}


def from_benchmarks(data: Dict) -> Measured:
    """A pytest-benchmark JSON of `pytest benchmarks/` (the networks and memory suites)."""
    measured = Measured()
    for b in data.get("benchmarks", []):
        e = b["extra_info"]
        if e.get("suite") == "network":
            variant = e.get("variant") or ("none" if e["norm"] == "none" else e["provider"])
            key = (e["network"], e["order"], e["memory_format"], e["batch"])
            measured.steps[key][variant] = e["median_s"]
        elif e.get("suite") == "memory":
            key = (e["kind"], e["shape"], e["order"], e["norm"], e["batch"])
            # Activation-sized tensors (cases.activation_bytes): the per-channel statistics
            # are float64 in fused by design.
            measured.saved[key][e["provider"]] = e.get("saved_activation_bytes",
                                                       e["saved_bytes"])
    return measured


def from_profile(rows: List[Dict]) -> Measured:
    """The rows of `python -m benchmarks.profile_step` (one network, its providers' steps)."""
    measured = Measured()
    for row in rows:
        key = (row["network"], row["order"], row["format"], row["batch"])
        for provider, p in row["providers"].items():
            measured.steps[key][provider] = p["step_ms"] / 1e3
    return measured


@dataclass
class Verdict:
    target: Target
    cells: List[Dict]           # the cells it applies to, each with "value" and "ok"

    @property
    def ok(self) -> Optional[bool]:
        """True / False, or None where the run measured no cell of the target."""
        return None if not self.cells else all(c["ok"] for c in self.cells)

    @property
    def worst(self) -> Optional[Dict]:
        if not self.cells:
            return None
        return (min if self.target.at_least else max)(self.cells, key=lambda c: c["value"])


def evaluate(measured: Measured, targets=TARGETS) -> List[Verdict]:
    verdicts = []
    for target in targets:
        cells = [dict(c, ok=target.holds(c["value"]))
                 for c in METRICS[target.metric].cells(measured) if target.applies(c)]
        verdicts.append(Verdict(target, cells))
    return verdicts


def mark(ok: Optional[bool]) -> str:
    return "–" if ok is None else "✓" if ok else "✗"


def cell_mark(metric: str, cell: Dict) -> str:
    """" ✓" / " ✗" for one table cell under the targets on `metric` that apply to it (none
    apply: empty), for the per-row marks of the report's tables."""
    applying = [t for t in TARGETS if t.metric == metric and t.applies(cell)]
    if not applying or cell.get("value") is None:
        return ""
    return " " + mark(all(t.holds(cell["value"]) for t in applying))


HEADER = ["", "target", "worst cell", "measured", "cells met", "measured by", "why"]


def _cell_name(cell: Dict) -> str:
    keys = [k for k in ("network", "what", "order", "format", "norm") if k in cell]
    return " ".join(str(cell[k]) for k in keys)


def rows(verdicts: List[Verdict]) -> List[List[str]]:
    """One row per target, for a Markdown or terminal table (HEADER)."""
    out = []
    for v in verdicts:
        worst = v.worst
        met = f"{sum(c['ok'] for c in v.cells)}/{len(v.cells)}" if v.cells else "not measured"
        out.append([mark(v.ok), v.target.figure, _cell_name(worst) if worst else "–",
                    v.target.show(worst["value"]) if worst else "–", met,
                    v.target.measurement, v.target.rationale])
    return out
