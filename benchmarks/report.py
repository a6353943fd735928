"""Benchmark JSON → Markdown: the targets (benchmarks/targets.py) marked ✓/✗ with their
measured figures, then the tables (medians, ratios, BN tax, GB/s, saved bytes).

    python -m benchmarks.report RUN.json [-o RUN.md]
    python -m benchmarks.report RUN.json --canonical [--date YYYY-MM-DD] [--machine KIND]

It reads three kinds of JSON: a pytest-benchmark run of `pytest benchmarks/` (`make bench`),
the rows of `python -m benchmarks.profile_step` (`make profile`) and the rows of
`python -m benchmarks.units`. Every figure comes from the run: medians and ratios of one
interleaved run per case (benchmarks/harness.py).

--canonical files the run as the current result of its suites on its kind of machine:
benchmarks/results/<machine>-<suite>.json and .md (e.g. cpu-2core-networks.json), one pair
per suite, replacing the previous one (older runs stay in git history). A suite run on some
networks only is filed under their names (cpu-2core-networks-resnet20.json). The JSON is
slimmed on the way: pytest-benchmark's per-round `data` arrays are dropped (the medians the
report reads are in each case's extra_info). JSON that does not say when or where it was
taken needs --date and --machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

from benchmarks import targets as tg

PROVIDERS = ("eager", "fused", "compile", "compile-fused")
ORDER_RANK = {"conv-bn-relu": 0, "conv-relu-bn": 1, "bn-conv-relu": 2}
RESULTS = Path(__file__).resolve().parent / "results"
NETWORKS = ("alexnet", "resnet20", "vgg16")


def _ms(x) -> str:
    return "–" if x is None else f"{1e3 * x:.2f}" if x < 1 else f"{1e3 * x:.0f}"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:+.1f} %"


def _x(x) -> str:
    return "–" if x is None else f"{x:.2f}×"


def _mib(x) -> str:
    return "–" if x is None else f"{x / 2 ** 20:.1f}"


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(r) + " |" for r in rows]]


def _section(title: str, header: List[str], rows: List[List[str]], note: str) -> List[str]:
    return [f"## {title}", "", *_table(header, rows), "", note, ""]


def targets_section(measured: tg.Measured) -> List[str]:
    verdicts = tg.evaluate(measured)
    return _section(
        "Targets", tg.HEADER, tg.rows(verdicts),
        "✓ every cell the target applies to meets it, ✗ at least one does not (worst cell "
        "shown), – this run has no cell for it. The targets: benchmarks/targets.py.")


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


def _ratio(med: Dict, top: str, bottom: str) -> Optional[float]:
    return med[top] / med[bottom] if top in med and bottom in med else None


def _tax(med: Dict, provider: str) -> Optional[float]:
    """BN tax against the none network of the same kind: eager's, or the compiled one."""
    ratio = _ratio(med, provider, "none-compile" if provider.startswith("compile") else "none")
    return None if ratio is None else ratio - 1


def networks_table(benches: List[Dict]) -> List[str]:
    groups = _by(benches, "network", "network", "order", "batch", "memory_format")
    if not groups:
        return []
    rows = []
    for (net, order, batch, fmt), p in sorted(
            groups.items(), key=lambda kv: (kv[0][0], kv[0][3], ORDER_RANK[kv[0][1]])):
        med = {k: v["median_s"] for k, v in p.items()}
        cell = dict(network=net, order=order, format=fmt, batch=batch)
        tax = {k: _tax(med, k) for k in PROVIDERS}
        vs_eager = _ratio(med, "eager", "fused")
        vs_compile = _ratio(med, "compile", "compile-fused")
        rows.append([net, order, fmt, str(batch),
                     *[_ms(med.get(k)) for k in (*PROVIDERS, "none")],
                     _x(vs_eager) + tg.cell_mark("eager_over_fused", dict(cell, value=vs_eager)),
                     _x(vs_compile) + tg.cell_mark("compile_over_compiled_fused",
                                                   dict(cell, value=vs_compile)),
                     _pct(tax["eager"]),
                     _pct(tax["fused"]) + tg.cell_mark("fused_bn_tax",
                                                       dict(cell, value=tax["fused"])),
                     _pct(tax["compile"]),
                     f"{p['fused']['gbps']:.1f}" if "fused" in p else "–",
                     " / ".join(f"{p[k]['compile_s']:.0f}" for k in ("compile", "compile-fused")
                                if k in p and "compile_s" in p[k]) or "–"])
    return _section(
        "Training step (forward + backward + SGD), median ms",
        ["network", "order", "format", "batch", "eager", "fused", "compile", "compile fused",
         "none", "fused vs eager", "compiled fused vs compiled eager", "BN tax eager",
         "BN tax fused", "BN tax compile", "fused GB/s", "compile s"], rows,
        "compile = torch.compile of the eager model, compile fused = of the fused model. "
        "BN tax = step / step of the same network with norm none − 1 (same interleaved run; "
        "compile against the compiled none network, timed with --wide only). ✓/✗: the "
        "targets above, per cell.")


def units_table(benches: List[Dict]) -> List[str]:
    groups = _by(benches, "unit", "shape", "order", "norm", "memory_format", "mode")
    if not groups:
        return []
    rows = []
    for (shape, order, norm, fmt, mode), p in groups.items():
        any_ = next(iter(p.values()))
        fused = p.get("fused")
        rows.append([shape, order, norm, fmt, mode, _ms(any_["floor_median_s"]),
                     *[_ms(p[k]["median_s"]) if k in p else "–" for k in PROVIDERS[:3]],
                     _x(fused["speedup_vs_eager"]) if fused else "–",
                     *[_pct(p[k]["bn_tax"]) if k in p else "–" for k in PROVIDERS[:3]],
                     f"{fused['gbps']:.1f} ({100 * fused['fraction_of_copy_bandwidth']:.0f} %)"
                     if fused else "–",
                     "yes" if any_["fits_in_cache"] else "no"])
    return _section(
        "One unit (batch 128), median ms",
        ["shape", "order", "norm", "format", "mode", "conv+relu", *PROVIDERS[:3],
         "fused vs eager", "tax eager", "tax fused", "tax compile", "fused GB/s (of copy)",
         "fits cache"], rows,
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
        cell = dict(kind=kind, what=what, order=order, norm=norm, batch=batch, value=cut)
        rows.append([kind, what, order, norm, str(batch), _mib(e["saved_bytes"]),
                     _mib(f["saved_bytes"]), _pct(-cut) + tg.cell_mark("saved_cut", cell),
                     _mib(e["peak_bytes"]), _mib(f["peak_bytes"]),
                     _pct(f["peak_ratio_to_eager"] - 1)])
    return _section(
        "Memory: saved for backward and peak live bytes (MiB)",
        ["kind", "unit / network", "order", "norm", "batch", "saved eager", "saved fused",
         "fused vs eager", "peak eager", "peak fused", "fused vs eager"], rows,
        "Saved: unique storages seen by saved_tensors_hooks in the training forward "
        "(parameters left out). ✓/✗: the saved-bytes targets above.")


def render_benchmarks(data: Dict) -> str:
    info = data.get("machine_info", {}).get("bnorder", {})
    benches = data["benchmarks"]
    loads = [x for b in benches for x in b["extra_info"].get("load_avg", [])]
    device = info.get("device_name") or info.get("device") or "cpu"
    head = [f"# bnorder benchmarks, {data.get('datetime', '')[:19]}", "",
            f"{device}, torch {info.get('torch', '?')}, {info.get('threads', '?')} threads, "
            f"copy bandwidth {info.get('copy_bandwidth_gbps', float('nan')):.1f} GB/s, "
            f"largest cache {info.get('cache_bytes', 0) >> 20} MiB, fp32"
            + (f", 1-min load average {min(loads):.1f}–{max(loads):.1f} while timing"
               if loads else "") + (" (quick smoke run)" if info.get("quick") else ""), ""]
    return "\n".join(head + targets_section(tg.from_benchmarks(data)) + networks_table(benches)
                     + units_table(benches) + memory_table(benches))


def render_profile(data: Dict) -> str:
    rows = data["rows"]
    rate = data["gemm_gflops"]
    table = []
    for row in rows:
        for provider, p in row["providers"].items():
            table.append([row["order"], row["format"], provider, f"{p['step_ms']:.1f}",
                          f"{p['conv_ms']:.1f}", f"{100 * p['conv_share']:.0f} %",
                          f"{p['step_ms'] - p['conv_ms']:.1f}", f"{p['conv_gflops']:.0f}",
                          f"{100 * p['conv_gflops'] / rate:.0f} %"])
    network = rows[0]["network"] if rows else "?"
    head = [f"# {network} training step profile, {data.get('datetime', '')[:19]}", "",
            f"{data.get('machine', '?')}, {data.get('threads', '?')} threads, batch "
            f"{rows[0]['batch'] if rows else '?'}, torch.mm rate {rate:.0f} GFLOP/s", ""]
    return "\n".join(head + targets_section(tg.from_profile(rows)) + _section(
        "ATen convolutions vs the rest of the step",
        ["order", "format", "provider", "step ms", "conv ms", "conv share", "rest ms",
         "conv GFLOP/s", "of mm rate"], table,
        "Step medians of interleaved unprofiled steps; conv ms: the outermost "
        "aten::convolution / convolution_backward calls of profiled steps (medians of "
        "separate steps: on a noisy machine conv ms can exceed step ms)."))


def render_units(rows: List[Dict], date: str = "") -> str:
    providers = [p for p in ("conv+relu", "eager", "fused", "compile") if p in rows[0]["ms"]]
    ratios = [k for k in ("fused_vs_eager", "fused_vs_compile") if k in rows[0]]
    table = [[r["shape"], r["order"], r["format"], r["mode"],
              *[f"{r['ms'][p]:.2f}" for p in providers],
              *[_pct(r["tax"][p]) for p in providers[1:]], *[_x(r[k]) for k in ratios]]
             for r in rows]
    runs = rows[0].get("runs", 1)
    return "\n".join([f"# One unit: {' vs '.join(providers[1:])}, {date}", ""] + _section(
        "Unit step, median ms",
        ["shape", "order", "format", "mode", *[f"{p} ms" for p in providers],
         *[f"tax {p}" for p in providers[1:]], *[k.replace("_", " ") for k in ratios]], table,
        f"python -m benchmarks.units; medians over {runs} process(es). tax = unit / "
        "conv+relu − 1."))


def kind_of(data) -> str:
    if isinstance(data, list):
        return "units"
    if "benchmarks" in data:
        return "benchmarks"
    if "rows" in data and "gemm_gflops" in data:
        return "profile"
    raise ValueError("not a benchmark JSON: expected a pytest-benchmark run "
                     "(key 'benchmarks'), a profile_step run (keys 'rows', 'gemm_gflops') "
                     "or a benchmarks.units list of rows")


def render(data, date: str = "") -> str:
    kind = kind_of(data)
    if kind == "benchmarks":
        return render_benchmarks(data)
    if kind == "profile":
        return render_profile(data)
    return render_units(data, date)


# ---------------------------------------------------------------------------- canonical

def slim(data: Dict) -> Dict:
    """The run without pytest-benchmark's per-round samples (`stats.data`): the report reads
    extra_info, and the samples are most of a large run's bytes."""
    if kind_of(data) != "benchmarks":
        return data
    out = dict(data)
    out["benchmarks"] = [dict(b, stats={k: v for k, v in b["stats"].items() if k != "data"})
                         if "stats" in b else b for b in data["benchmarks"]]
    return out


def machine_kind(data) -> Optional[str]:
    """`cpu-<cores>core` or `cuda-<device name>`, from what the run recorded; None if it
    recorded nothing."""
    if not isinstance(data, dict):
        return None
    if "machine" in data:
        return data["machine"]
    info = data.get("machine_info", {})
    bn = info.get("bnorder", {})
    if bn.get("device") == "cuda":
        name = re.sub(r"[^a-z0-9]+", "-", (bn.get("device_name") or "gpu").lower()).strip("-")
        return f"cuda-{name}"
    cores = info.get("cpu", {}).get("count")
    return f"cpu-{cores}core" if cores else None


def _networks_suffix(benches: List[Dict]) -> str:
    nets = sorted({b["extra_info"].get("network") for b in benches} - {None})
    return "" if set(nets) >= set(NETWORKS) else "-" + "-".join(nets)


def split_suites(data) -> Dict[str, object]:
    """{suite name: the part of the run that belongs to it}."""
    kind = kind_of(data)
    if kind == "profile":
        nets = sorted({r["network"] for r in data["rows"]})
        return {"profile-" + "-".join(nets): data}
    if kind == "units":
        providers = [p for p in data[0]["ms"] if p != "conv+relu"] if data else []
        return {"unit-steps-" + "-".join(providers): data}
    names = {"network": "networks", "unit": "units", "memory": "memory"}
    by_suite: Dict[str, List[Dict]] = defaultdict(list)
    for b in data["benchmarks"]:
        by_suite[b["extra_info"].get("suite")].append(b)
    out = {}
    for suite, benches in by_suite.items():
        if suite not in names:
            continue
        out[names[suite] + _networks_suffix(benches)] = dict(data, benchmarks=benches)
    return out


def write_canonical(data, folder: Path = RESULTS, date: Optional[str] = None,
                    machine: Optional[str] = None) -> List[Path]:
    """Write each suite of the run as folder/<machine>-<suite>.json and .md; returns the
    paths written."""
    machine = machine or machine_kind(data)
    if machine is None:
        raise ValueError("the JSON does not say which machine it was taken on: pass --machine "
                         "(e.g. cpu-2core)")
    when = date or (data.get("datetime") if isinstance(data, dict) else None)
    if not when:
        raise ValueError("the JSON does not say when it was taken: pass --date YYYY-MM-DD")
    if isinstance(data, dict):
        data = dict(data, datetime=when, machine=machine)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for suite, part in split_suites(data).items():
        stem = folder / f"{machine}-{suite}"
        part = slim(part)
        stem.with_suffix(".json").write_text(json.dumps(part, indent=1) + "\n")
        stem.with_suffix(".md").write_text(render(part, when[:10]) + "\n")
        written += [stem.with_suffix(".json"), stem.with_suffix(".md")]
    return written


def _date(text: str) -> str:
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from None
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json")
    parser.add_argument("-o", "--out", help="write the Markdown here instead of stdout")
    parser.add_argument("--canonical", action="store_true",
                        help="file the run under benchmarks/results/ as the current result "
                             "of its suites on its kind of machine")
    parser.add_argument("--date", type=_date, help="when the run was taken, if its JSON "
                                                   "does not say")
    parser.add_argument("--machine", help="the kind of machine (cpu-2core, cuda-h100, ...), "
                                          "if its JSON does not say")
    args = parser.parse_args(argv)
    try:
        with open(args.json) as f:
            data = json.load(f)
        kind_of(data)
    except (OSError, json.JSONDecodeError, ValueError) as e:
        parser.error(f"{args.json}: {e}")
    if args.canonical:
        try:
            for path in write_canonical(data, date=args.date, machine=args.machine):
                print(f"wrote {path}")
        except ValueError as e:
            parser.error(str(e))
        return 0
    text = render(data, args.date or "")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
