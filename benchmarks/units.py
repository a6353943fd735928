"""One unit at the layer shapes of ResNet-20 and VGG-16: fused vs eager vs torch.compile.

    python -m benchmarks.units [--formats nchw,nhwc] [--providers eager,fused,compile]
                               [--modes fwd,fwdbwd] [--rounds 7] [--json FILE]
                               [--shapes 0,2 | tiny] [--batch 128] [--processes 3]

For every shape, order and memory format it times, interleaved in one process:

    conv+relu   the unit with norm "none" in eager PyTorch: the floor a fused unit can reach
                (the convolution stays in ATen)
    eager       the unit in eager PyTorch (nn.Conv2d, nn.BatchNorm2d, ReLU)
    fused       this package's fused unit
    compile     torch.compile (inductor) of the eager unit; compile time reported apart

and prints medians and the *unit BN tax*: unit time / conv+relu time − 1.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from tqdm import tqdm

import fused
from benchmarks import common
from benchmarks.cases import FORMATS as formats, build_unit as build, make_step

# (label, in_channels, out_channels, spatial size); batch 128 as in training.
SHAPES = [
    ("resnet20 16ch 32px", 16, 16, 32),
    ("resnet20 32ch 16px", 32, 32, 16),
    ("resnet20 64ch 8px", 64, 64, 8),
    ("vgg16 128ch 16px", 128, 128, 16),
]
BATCH = 128
# A unit so small that its time is the fixed cost per unit and step (Python, dispatch,
# autograd): `--shapes tiny --batch 2`.
TINY = ("fixed cost 4ch 4px", 4, 4, 4)


def run(args) -> list:
    rows = []
    cases = [(s, o, f, m) for s in SHAPES for o in fused.ORDERS for f in args.formats
             for m in args.modes]
    bar = tqdm(cases, desc="units", unit="case", file=sys.stderr)
    for (label, cin, cout, px), order, fmt_name, mode in bar:
        bar.set_postfix_str(f"{label} {order} {fmt_name} {mode}")
        fmt = formats[fmt_name]
        x = torch.randn(BATCH, cin, px, px).contiguous(memory_format=fmt).requires_grad_()
        modules = {"conv+relu": build(order, cin, cout, "none", "eager", fmt)}
        if "eager" in args.providers:
            modules["eager"] = build(order, cin, cout, "bn", "eager", fmt)
        if "fused" in args.providers:
            modules["fused"] = build(order, cin, cout, "bn", "fused", fmt)
        compile_s = None
        if "compile" in args.providers:
            start = time.perf_counter()
            compiled = torch.compile(build(order, cin, cout, "bn", "eager", fmt))
            make_step(compiled, x, mode)()
            compile_s = time.perf_counter() - start
            modules["compile"] = compiled
        steps = {name: make_step(m, x, mode) for name, m in modules.items()}
        samples = common.time_interleaved(steps, rounds=args.rounds, inner=args.inner)
        med = {name: common.median(v) for name, v in samples.items()}
        row = dict(shape=label, order=order, format=fmt_name, mode=mode,
                   ms={k: 1e3 * v for k, v in med.items()},
                   tax={k: med[k] / med["conv+relu"] - 1 for k in med if k != "conv+relu"},
                   compile_s=compile_s)
        if "fused" in med and "eager" in med:
            row["fused_vs_eager"] = med["eager"] / med["fused"]
        if "fused" in med and "compile" in med:
            row["fused_vs_compile"] = med["compile"] / med["fused"]
        rows.append(row)
    return rows


def repeat_in_processes(argv: list, times: int) -> list:
    """Run this benchmark `times` times, each in a fresh process, and combine the rows:
    medians over the runs of every time, tax and ratio, plus each tax's range.

    The machines here are slow or fast by the process (up to 25 % on ATen's own
    convolution), which interleaving inside one process cannot cancel; the median of
    several processes can."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(times):
            out = os.path.join(tmp, f"run{k}.json")
            print(f"process {k + 1}/{times}", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "benchmarks.units", *argv, "--json", out],
                           check=True, stdout=subprocess.DEVNULL)
            with open(out) as f:
                runs.append(json.load(f))
    combined = []
    for rows in zip(*runs):
        first = rows[0]
        row = dict(shape=first["shape"], order=first["order"], format=first["format"],
                   mode=first["mode"], runs=len(rows),
                   ms={p: statistics.median(r["ms"][p] for r in rows) for p in first["ms"]},
                   tax={p: statistics.median(r["tax"][p] for r in rows) for p in first["tax"]},
                   tax_range={p: (min(r["tax"][p] for r in rows), max(r["tax"][p] for r in rows))
                              for p in first["tax"]},
                   compile_s=first.get("compile_s"))
        for ratio in ("fused_vs_eager", "fused_vs_compile"):
            if ratio in first:
                row[ratio] = statistics.median(r[ratio] for r in rows)
        combined.append(row)
    return combined


def print_table(rows: list) -> None:
    from rich.console import Console
    from rich.table import Table

    providers = [p for p in ("conv+relu", "eager", "fused", "compile") if p in rows[0]["ms"]]
    # A ratio column only where both of its providers ran.
    ratios = [(label, key) for label, key in (("fused speed-up vs eager", "fused_vs_eager"),
                                              ("fused speed-up vs compile", "fused_vs_compile"))
              if key in rows[0]]
    table = Table(title=f"One unit, batch {BATCH}, fp32, {torch.get_num_threads()} threads "
                        f"(median ms; BN tax = unit / conv+relu − 1)")
    for col in ["shape", "order", "fmt", "mode", *[f"{p} ms" for p in providers],
                *[f"tax {p}" for p in providers[1:]], *[label for label, _ in ratios]]:
        table.add_column(col, justify="right" if col not in ("shape", "order") else "left")
    def tax(r, p):
        text = f"{100 * r['tax'][p]:+.0f}%"
        if "tax_range" in r:
            low, high = r["tax_range"][p]
            text += f" ({100 * low:+.0f}…{100 * high:+.0f})"
        return text

    for r in rows:
        table.add_row(r["shape"], r["order"], r["format"], r["mode"],
                      *[f"{r['ms'][p]:.2f}" for p in providers],
                      *[tax(r, p) for p in providers[1:]],
                      *[f"{r[key]:.2f}x" for _, key in ratios])
    if "runs" in rows[0]:
        table.caption = (f"medians over {rows[0]['runs']} processes; in brackets the lowest and "
                         f"highest tax of the processes")
    Console(width=220).print(table)


def _without_options(argv: list, names) -> list:
    """argv without the given options and their values (`--name value` or `--name=value`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif not any(arg.startswith(name + "=") for name in names):
            out.append(arg)
    return out


def main(argv=None) -> None:
    global SHAPES, BATCH
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="nchw,nhwc")
    parser.add_argument("--providers", default="eager,fused,compile")
    parser.add_argument("--modes", default="fwd,fwdbwd")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--inner", type=int, default=3)
    parser.add_argument("--shapes", default="all",
                        help="comma-separated indices into SHAPES, or 'tiny' (the fixed cost)")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: torch's choice, all cores)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--processes", type=int, default=1,
                        help="repeat the whole run in this many fresh processes and report "
                             "medians (the machine's speed varies by process)")
    args = parser.parse_args(argv)
    args.formats = args.formats.split(",")
    args.providers = args.providers.split(",")
    args.modes = args.modes.split(",")
    if args.batch < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")
    BATCH = args.batch
    if args.shapes == "tiny":
        SHAPES = [TINY]
    elif args.shapes != "all":
        try:
            SHAPES = [SHAPES[int(i)] for i in args.shapes.split(",")]
        except (ValueError, IndexError):
            parser.error(f"--shapes: expected 'all', 'tiny' or indices 0-{len(SHAPES) - 1}, "
                         f"got {args.shapes!r}")
    if args.processes < 1:
        parser.error(f"--processes must be at least 1, got {args.processes}")
    common.ensure_allocator_env("benchmarks.units")
    if args.processes > 1:
        child_argv = _without_options(argv if argv is not None else sys.argv[1:],
                                      ("--processes", "--json"))
        rows = repeat_in_processes(child_argv, args.processes)
        print_table(rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"backend {fused.backend()}, copy bandwidth "
          f"{common.copy_bandwidth() / 1e9:.1f} GB/s, largest cache "
          f"{common.cache_bytes() >> 20} MiB", file=sys.stderr)
    rows = run(args)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
