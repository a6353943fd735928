"""pytest-benchmark JSON of `pytest benchmarks/` → Markdown tables (medians, ratios, BN tax,
GB/s, saved bytes) for the README.

    python -m benchmarks.report benchmarks/results/<date>.json [-o benchmarks/results/<date>.md]

Every figure comes from the run's extra_info: medians and ratios of one interleaved run per
case (benchmarks/harness.py). Targets of issue 6 are marked ✓/✗ where the run has the data.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Dict, List

PROVIDERS = ("eager", "fused", "compile")
ORDER_RANK = {"conv-bn-relu": 0, "conv-relu-bn": 1, "bn-conv-relu": 2}
# issue 6: fused BN tax per network, fused step speed-up on resnet20, saved-bytes cut
TAX_TARGET = {"resnet20": 0.10, "vgg16": 0.03, "alexnet": 0.03}
SPEEDUP_TARGET = {"eager": 1.2, "compile": 1.5}
SAVED_CUT_TARGET = 0.30


def _ms(x) -> str:
    return "–" if x is None else f"{1e3 * x:.2f}" if x < 1 else f"{1e3 * x:.0f}"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:+.1f} %"


def _x(x) -> str:
    return "–" if x is None else f"{x:.2f}×"


def _mib(x) -> str:
    return "–" if x is None else f"{x / 2 ** 20:.1f}"


def _mark(ok) -> str:
    return "" if ok is None else " ✓" if ok else " ✗"


def _section(title: str, header: List[str], rows: List[List[str]], note: str) -> List[str]:
    return [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(r) + " |" for r in rows], "", note, ""]


def _by(benches: List[Dict], suite: str, *keys: str) -> Dict[tuple, Dict[str, Dict]]:
    """{(extra_info[k] for k in keys): {variant: extra_info}} of one suite (the variant is
    the provider, or for the networks' norm none `none` / `none-compile`)."""
    out: Dict[tuple, Dict[str, Dict]] = defaultdict(dict)
    for b in benches:
        e = b["extra_info"]
        if e.get("suite") == suite:
            variant = e.get("variant") or ("none" if suite == "network" and e["norm"] == "none"
                                           else e["provider"])
            out[tuple(e[k] for k in keys)][variant] = e
    return out


def networks_table(benches: List[Dict]) -> List[str]:
    groups = _by(benches, "network", "network", "order", "batch", "memory_format")
    if not groups:
        return []
    rows = []
    for (net, order, batch, fmt), p in sorted(
            groups.items(), key=lambda kv: (kv[0][0], kv[0][3], ORDER_RANK[kv[0][1]])):
        med = {k: v["median_s"] for k, v in p.items()}
        tax = {k: p[k].get("bn_tax") if k in p else None for k in PROVIDERS}
        fused = med.get("fused")
        vs = {k: med[k] / fused if fused and k in med else None for k in ("eager", "compile")}
        tax_ok = None if tax["fused"] is None else tax["fused"] <= TAX_TARGET.get(net, 0)
        speed_ok = {k: None if net != "resnet20" or vs[k] is None else vs[k] >= t
                    for k, t in SPEEDUP_TARGET.items()}
        rows.append([net, order, fmt, str(batch),
                     *[_ms(med.get(k)) for k in (*PROVIDERS, "none")],
                     _x(vs["eager"]) + _mark(speed_ok["eager"]),
                     _x(vs["compile"]) + _mark(speed_ok["compile"]),
                     _pct(tax["eager"]), _pct(tax["fused"]) + _mark(tax_ok),
                     _pct(tax["compile"]),
                     f"{p['fused']['gbps']:.1f}" if "fused" in p else "–",
                     f"{p['compile']['compile_s']:.0f}" if "compile" in p else "–"])
    return _section(
        "Training step (forward + backward + SGD), median ms",
        ["network", "order", "format", "batch", "eager", "fused", "compile", "none",
         "fused vs eager",
         "fused vs compile", "BN tax eager", "BN tax fused", "BN tax compile", "fused GB/s",
         "compile s"], rows,
        "BN tax = step / step of the same network with norm none − 1 (same interleaved run; "
        "compile against the compiled none network, timed with --wide only). "
        "Targets: fused BN tax ≤ 10 % on resnet20, ≤ 3 % on vgg16 and alexnet; fused "
        "resnet20 step ≥ 1.2× eager and ≥ 1.5× torch.compile.")


def units_table(benches: List[Dict]) -> List[str]:
    groups = _by(benches, "unit", "shape", "order", "norm", "memory_format", "mode")
    if not groups:
        return []
    rows = []
    for (shape, order, norm, fmt, mode), p in groups.items():
        any_ = next(iter(p.values()))
        fused = p.get("fused")
        rows.append([shape, order, norm, fmt, mode, _ms(any_["floor_median_s"]),
                     *[_ms(p[k]["median_s"]) if k in p else "–" for k in PROVIDERS],
                     _x(fused["speedup_vs_eager"]) if fused else "–",
                     *[_pct(p[k]["bn_tax"]) if k in p else "–" for k in PROVIDERS],
                     f"{fused['gbps']:.1f} ({100 * fused['fraction_of_copy_bandwidth']:.0f} %)"
                     if fused else "–",
                     "yes" if any_["fits_in_cache"] else "no"])
    return _section(
        "One unit (batch 128), median ms",
        ["shape", "order", "norm", "format", "mode", "conv+relu", *PROVIDERS, "fused vs eager",
         "tax eager", "tax fused", "tax compile", "fused GB/s (of copy)", "fits cache"], rows,
        "tax = unit / conv+relu (same unit, empty norm slot) − 1, same interleaved run. GB/s "
        "from DESIGN §4's bytes model (benchmarks.cases.unit_bytes).")


def memory_table(benches: List[Dict]) -> List[str]:
    groups = _by(benches, "memory", "kind", "shape", "order", "norm", "batch")
    if not groups:
        return []
    rows = []
    for (kind, what, order, norm, batch), p in groups.items():
        if not {"eager", "fused"} <= set(p):
            continue
        e, f = p["eager"], p["fused"]
        cut = 1 - f["saved_ratio_to_eager"]
        ok = cut >= SAVED_CUT_TARGET if order == "bn-conv-relu" else cut >= 0
        rows.append([kind, what, order, norm, str(batch), _mib(e["saved_bytes"]),
                     _mib(f["saved_bytes"]), _pct(-cut) + _mark(ok), _mib(e["peak_bytes"]),
                     _mib(f["peak_bytes"]), _pct(f["peak_ratio_to_eager"] - 1)])
    return _section(
        "Memory: saved for backward and peak live bytes (MiB)",
        ["kind", "unit / network", "order", "norm", "batch", "saved eager", "saved fused",
         "fused vs eager", "peak eager", "peak fused", "fused vs eager"], rows,
        "Saved: unique storages seen by saved_tensors_hooks in the training forward "
        "(parameters left out). Targets: bn-conv-relu ≥ 30 % below eager, no order above "
        "eager.")


def render(data: Dict) -> str:
    info = data.get("machine_info", {}).get("bnorder", {})
    benches = data["benchmarks"]
    loads = [x for b in benches for x in b["extra_info"].get("load_avg", [])]
    head = [f"# bnorder benchmarks, {data.get('datetime', '')[:19]}", "",
            f"torch {info.get('torch', '?')}, {info.get('threads', '?')} threads, copy "
            f"bandwidth {info.get('copy_bandwidth_gbps', float('nan')):.1f} GB/s, largest "
            f"cache {info.get('cache_bytes', 0) >> 20} MiB, fp32"
            + (f", 1-min load average {min(loads):.1f}–{max(loads):.1f} while timing"
               if loads else "") + (" (quick smoke run)" if info.get("quick") else ""), ""]
    return "\n".join(head + networks_table(benches) + units_table(benches)
                     + memory_table(benches))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json")
    parser.add_argument("-o", "--out", help="write here instead of stdout")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        text = render(json.load(f))
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
