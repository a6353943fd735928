"""Self-check of the fused kernels on this machine: `python -m fused.check` or `bnorder check`.

    python -m fused.check [--backend cpp|triton|reference|all] [--quick]

Runs every order × norm × mode (training, eval) through the fused functional ops of each
backend and compares the output, every gradient (input, conv weight, conv bias, gamma, beta)
and the running statistics with the float64 eager reference (fused.reference.unit_forward
with autograd). Eager PyTorch runs the same case at the same precision, and a row passes
when

    max|fused − ref| / max|ref|  ≤  2 · (eager's own error) + tol

with tol 1e-10 for float64, 1e-5 (outputs) / 1e-4 (gradients) for float32, 1e-3 for
float16/bfloat16 (DESIGN §6). The Triton backend is checked with both conv_impl values.

Which backends: by default those the machine has — `cpp` for CPU tensors (or `reference` when
the C++ extension is missing; its load error is printed), `triton` on a CUDA GPU.
`--backend triton` without a GPU runs the Triton kernels in Triton's interpreter on CPU tensors
(slow: use --quick). On a GPU the check also times each Triton kernel and prints achieved
GB/s, TFLOP/s and the ratio to eager PyTorch (expected figures: fused/triton/README.md).
Exit status 0 when every row passes.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

BACKEND_CHOICES = ("auto", "cpp", "triton", "reference", "all")


@dataclass
class Row:
    backend: str
    conv_impl: str
    dtype: str
    layout: str
    order: str
    norm: str
    mode: str
    errors: Dict[str, float]      # group -> fused relative error
    eager: Dict[str, float]       # group -> eager relative error
    passed: bool
    note: str = ""


def _parse(argv: Optional[List[str]]):
    p = argparse.ArgumentParser(prog="python -m fused.check", description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                   help="auto: the backends this machine has (default); all: every backend "
                        "that can run here, the Triton interpreter included")
    p.add_argument("--quick", action="store_true",
                   help="batch norm only, float32, NCHW: a few seconds per backend")
    return p.parse_args(argv)


def _backends(choice: str) -> List[str]:
    from . import _ext
    cuda = torch.cuda.is_available()
    cpu = "cpp" if _ext.loaded else "reference"
    if choice == "auto":
        return [cpu] + (["triton"] if cuda else [])
    if choice == "all":
        return ([cpu] if cpu == "reference" else ["cpp", "reference"]) + ["triton"]
    return [choice]


def _prepare_triton() -> Optional[str]:
    """Without a GPU the Triton kernels need the interpreter, which must be switched on
    before they are defined. Returns why Triton cannot run, or None."""
    if torch.cuda.is_available():
        return None
    if "fused.triton.norm_kernels" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
        return None
    from .triton import _common
    if not _common.interpreting():
        return ("no GPU, and the Triton kernels were imported without TRITON_INTERPRET=1; "
                "rerun as TRITON_INTERPRET=1 python -m fused.check --backend triton")
    return None


@contextlib.contextmanager
def _environ(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------------------
# One case: fused vs float64 reference vs eager at the same precision
# ----------------------------------------------------------------------------------------

_GROUPS = {"out": ("out",), "grads": ("dx", "dweight", "dbias", "dgamma", "dbeta"),
           "stats": ("running_mean", "running_var")}


def _make_inputs(order: str, norm: str, stride: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n, c_in, c_out, hw = 3, 3, 5, (7, 7)
    c = c_in if order == "bn-conv-relu" else c_out
    d = torch.float64
    t = dict(x=torch.randn(n, c_in, *hw, generator=g, dtype=d) + 0.5,
             weight=torch.randn(c_out, c_in, 3, 3, generator=g, dtype=d) * 0.3,
             bias=torch.randn(c_out, generator=g, dtype=d) * 0.1,
             running_mean=torch.randn(c, generator=g, dtype=d) * 0.2,
             running_var=torch.rand(c, generator=g, dtype=d) + 0.5,
             norm_weight=torch.rand(c, generator=g, dtype=d) + 0.5,
             norm_bias=torch.randn(c, generator=g, dtype=d) * 0.2)
    t["stride"] = stride
    if norm in ("affine", "none"):
        t["running_mean"] = t["running_var"] = None
    if norm in ("bn-minus", "none"):
        t["norm_weight"] = t["norm_bias"] = None
    return t


def _run(fn, inputs: dict, dtype: torch.dtype, channels_last: bool, training: bool,
         norm: str, grad_out: Optional[torch.Tensor]) -> dict:
    low = dtype in (torch.float16, torch.bfloat16)
    stat = torch.float64 if dtype == torch.float64 else torch.float32

    def leaf(key, dt):
        v = inputs[key]
        return None if v is None else v.detach().clone().to(dt).requires_grad_(True)

    x = inputs["x"].to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w, b = leaf("weight", dtype), leaf("bias", dtype)
    gamma, beta = leaf("norm_weight", stat if low else dtype), leaf("norm_bias",
                                                                   stat if low else dtype)
    rm = None if inputs["running_mean"] is None else inputs["running_mean"].clone().to(stat)
    rv = None if inputs["running_var"] is None else inputs["running_var"].clone().to(stat)
    out = fn(x, w, b, inputs["stride"], 1, 1, 1, rm, rv, gamma, beta, training, 0.1, 1e-5,
             norm, True)
    result = {"out": out.detach(), "running_mean": rm, "running_var": rv}
    if grad_out is not None:
        leaves = {"dx": x, "dweight": w, "dbias": b, "dgamma": gamma, "dbeta": beta}
        leaves = {k: v for k, v in leaves.items() if v is not None}
        grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype))
        result.update(zip(leaves, grads))
    return result


def _relative_errors(got: dict, ref: dict) -> Dict[str, float]:
    errors = {}
    for group, keys in _GROUPS.items():
        worst = 0.0
        for key in keys:
            if ref.get(key) is None:
                continue
            exp = ref[key].double()
            scale = exp.abs().max().item()
            if key == "dbias":  # exactly 0 in front of a batch norm: scale by dW
                scale = max(scale, ref["dweight"].double().abs().max().item())
            err = (got[key].double().to(exp.device) - exp).abs().max().item()
            worst = max(worst, err / max(scale, 1e-30))
        errors[group] = worst
    return errors


def _tolerance(dtype: torch.dtype, group: str) -> float:
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-5 if group == "out" else 1e-4
    return 1e-3


def check_case(order: str, norm: str, training: bool, dtype: torch.dtype, device: str,
               channels_last: bool = False, stride: int = 1) -> tuple:
    """(fused errors, eager errors, passed) for one unit configuration."""
    import fused
    from . import reference
    fns = {"conv-bn-relu": fused.conv_bn_relu, "conv-relu-bn": fused.conv_relu_bn,
           "bn-conv-relu": fused.bn_conv_relu}
    inputs = _make_inputs(order, norm, stride)

    def eager(x, *args):
        return reference.unit_forward(order, x, *args)

    probe = _run(eager, inputs, torch.float64, False, training, norm, None)["out"]
    grad_out = torch.randn(probe.shape, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(1))
    ref = _run(eager, inputs, torch.float64, False, training, norm, grad_out)
    on_device = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                 for k, v in inputs.items()}
    got = _run(fns[order], on_device, dtype, channels_last, training, norm,
               grad_out.to(device))
    mine = _relative_errors(got, ref)
    theirs = _relative_errors(_run(eager, on_device, dtype, channels_last, training, norm,
                                   grad_out.to(device)), ref)
    passed = all(mine[g] <= 2 * theirs[g] + _tolerance(dtype, g) for g in mine)
    if channels_last:
        passed = passed and got["out"].is_contiguous(memory_format=torch.channels_last)
    return mine, theirs, passed


def battery(backend: str, quick: bool) -> List[Row]:
    from .reference import NORMS, ORDERS
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    impls = ("aten", "triton") if backend == "triton" else ("-",)
    norms = ("bn",) if quick else NORMS
    dtypes = [torch.float32] if quick else [torch.float64, torch.float32]
    if device == "cuda" and not quick:
        dtypes += [torch.float16, torch.bfloat16]
    layouts = [(False, 1)] if quick else [(False, 1), (True, 2)]
    rows = []
    for impl in impls:
        env = {"FUSED_BACKEND": backend}
        if impl != "-":
            env["BNORDER_CONV_IMPL"] = impl
        with _environ(**env):
            for dtype in dtypes:
                for channels_last, stride in layouts:
                    for order in ORDERS:
                        for norm in norms:
                            for training in (True, False):
                                rows.append(_row(backend, impl, dtype, channels_last, stride,
                                                 order, norm, training, device))
    return rows


_SHORT = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16",
          torch.bfloat16: "bf16"}


def _row(backend, impl, dtype, channels_last, stride, order, norm, training, device) -> Row:
    layout = ("nhwc" if channels_last else "nchw") + (f" s{stride}" if stride > 1 else "")
    mode = "train" if training else "eval"
    name = _SHORT[dtype]
    try:
        mine, theirs, passed = check_case(order, norm, training, dtype, device, channels_last,
                                          stride)
        return Row(backend, impl, name, layout, order, norm, mode, mine, theirs, passed)
    except Exception as exc:  # a crash is a failed row, reported, not a traceback
        return Row(backend, impl, name, layout, order, norm, mode, {}, {}, False,
                   f"{type(exc).__name__}: {exc}"[:120])


# ----------------------------------------------------------------------------------------
# GPU throughput (CUDA only)
# ----------------------------------------------------------------------------------------

def _cuda_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def throughput(n: int = 64, c: int = 64, hw: int = 56, dtype=torch.float16) -> List[tuple]:
    """(kernel, ms, achieved, unit, eager ms, eager/fused) rows for the Triton kernels."""
    import torch.nn.functional as F
    from .triton import conv as tconv, primitives as tp
    dev = "cuda"
    t = torch.randn(n, c, hw, hw, device=dev, dtype=dtype)
    g = torch.randn_like(t)
    v = [torch.rand(c, device=dev) + 0.5 for _ in range(6)]
    mean, scale, shift, k1, k2, k3 = v
    size = t.numel() * t.element_size()
    gamma, beta = v[1].clone().requires_grad_(), v[2].clone().requires_grad_()
    xin = t.clone().requires_grad_()

    def eager_fwd():
        return F.relu(F.batch_norm(xin, None, None, gamma, beta, True))

    out = eager_fwd()
    rows = []
    eager_f = _cuda_ms(eager_fwd)
    eager_b = _cuda_ms(lambda: torch.autograd.grad(out, [xin, gamma, beta], g,
                                                   retain_graph=True))
    kernels = [("stats", lambda: tp.stats(t, 1), 1, eager_f),
               ("apply", lambda: tp.apply(t, scale, shift, 1), 2, eager_f),
               ("backward_reduce", lambda: tp.backward_reduce(g, t, mean, scale, shift, 1), 2,
                eager_b),
               ("backward_apply",
                lambda: tp.backward_apply(g, t, mean, scale, shift, k1, k2, k3, 1), 3,
                eager_b)]
    copy_ms = _cuda_ms(lambda: t.clone())
    rows.append(("copy (reference)", copy_ms, 2 * size / copy_ms / 1e6, "GB/s", None, None))
    for name, fn, passes, eager_ms in kernels:
        ms = _cuda_ms(fn)
        rows.append((name, ms, passes * size / ms / 1e6, "GB/s", eager_ms, eager_ms / ms))
    w = torch.randn(c, c, 3, 3, device=dev, dtype=dtype) * 0.05
    flops = 2 * n * hw * hw * c * c * 9
    aten_ms = _cuda_ms(lambda: F.conv2d(t, w, None, 1, 1))
    for name, kwargs in (("conv 3x3 (triton)", {}),
                         ("conv 3x3 + stats epilogue", {"stats_mode": 1}),
                         ("conv 3x3 + norm prologue", {"in_scale": scale, "in_shift": shift})):
        ms = _cuda_ms(lambda: tconv.conv_forward(t, w, None, [1, 1], [1, 1], [1, 1], **kwargs))
        rows.append((name, ms, flops / ms / 1e9, "TFLOP/s", aten_ms, aten_ms / ms))
    rows.append(("conv 3x3 (aten/cuDNN)", aten_ms, flops / aten_ms / 1e9, "TFLOP/s", None,
                 None))
    return rows


# ----------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------

def _print_rows(console, rows: List[Row]) -> None:
    from rich.table import Table
    table = Table(title="fused vs float64 reference: max |error| / max |ref| (eager's own in "
                        "parentheses)")
    for col in ("backend", "conv", "dtype", "layout", "order", "norm", "mode", "out",
                "grads", "running stats", "result"):
        table.add_column(col)

    def cell(row, group):
        if group not in row.errors:
            return "-"
        return f"{row.errors[group]:.1e} ({row.eager[group]:.1e})"

    for r in rows:
        result = "[green]pass[/]" if r.passed else f"[red]FAIL[/] {r.note}"
        table.add_row(r.backend, r.conv_impl, r.dtype, r.layout, r.order, r.norm, r.mode,
                      cell(r, "out"), cell(r, "grads"),
                      cell(r, "stats") if r.errors.get("stats") is not None and
                      r.mode == "train" else "-", result)
    console.print(table)


def _print_throughput(console, rows) -> None:
    from rich.table import Table
    table = Table(title=f"Triton kernels on {torch.cuda.get_device_name()} "
                        f"(N=64, C=64, 56x56, float16)")
    for col in ("kernel", "ms", "achieved", "eager ms", "eager / fused"):
        table.add_column(col)
    for name, ms, achieved, unit, eager_ms, ratio in rows:
        table.add_row(name, f"{ms:.3f}", f"{achieved:.0f} {unit}" if unit == "GB/s"
                      else f"{achieved:.1f} {unit}",
                      "-" if eager_ms is None else f"{eager_ms:.3f}",
                      "-" if ratio is None else f"{ratio:.2f}x")
    console.print(table)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse(argv)
    from rich.console import Console
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)  # logs and pipes: keep the table readable
    backends = _backends(args.backend)
    blocked = {}
    if "triton" in backends:
        reason = _prepare_triton()
        if reason:
            blocked["triton"] = reason
    import fused
    error = fused.extension_error()
    if error:
        console.print(f"[yellow]C++ extension not loaded[/]: {error}\n"
                      f"CPU tensors use the reference backend (correct, slower).")
    console.print(f"backends checked: {', '.join(backends)}"
                  f"{'' if torch.cuda.is_available() else ' (no GPU: Triton runs in its interpreter)' if 'triton' in backends else ''}")
    rows: List[Row] = []
    for backend in backends:
        if backend in blocked:
            rows.append(Row(backend, "-", "-", "-", "-", "-", "-", {}, {}, False,
                            blocked[backend]))
            continue
        rows.extend(battery(backend, args.quick))
    _print_rows(console, rows)
    if "triton" in backends and "triton" not in blocked and torch.cuda.is_available():
        _print_throughput(console, throughput())
    failed = sum(not r.passed for r in rows)
    console.print(f"{len(rows) - failed}/{len(rows)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
