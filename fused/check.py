"""Self-check of the fused kernels on this machine: `python -m fused.check` or `bnorder check`.

    python -m fused.check [--backend cpp|triton|reference|all] [--quick]
    python -m fused.check --gpu [--quick] [--no-timing] [--layer NAME] [--dtype fp16|bf16|fp32]

Runs every order × norm × mode (training, eval) through the fused functional ops of each
backend and compares the output, every gradient (input, conv weight, conv bias, gamma, beta)
and the running statistics with the float64 eager reference (fused.reference.unit_forward
with autograd). Eager PyTorch runs the same case at the same precision on the same device
(cuDNN on a GPU), and a row passes when

    max|fused − ref| / max|ref|  ≤  2 · (eager's own error) + tol

with tol 1e-10 for float64, 1e-5 (outputs) / 1e-4 (gradients) for float32, 1e-3 for
float16/bfloat16 (DESIGN §6). The Triton backend is checked with both conv_impl values.

Which backends: by default those the machine has — `cpp` for CPU tensors (or `reference` when
the C++ extension is missing; its load error is printed), `triton` on a CUDA GPU.
`--backend triton` without a GPU runs the Triton kernels in Triton's interpreter on CPU tensors
(slow: use --quick); the interpreter must be on from the process's start:
`TRITON_INTERPRET=1 python -m fused.check --backend triton --quick`.

`--gpu` (`bnorder check --gpu`) is the first thing to run on a GPU: the Triton backend on
CUDA tensors in float64, float32, float16 and bfloat16, NCHW and channels_last, then a timing
table at one layer shape (fused.triton.roofline.LAYERS): the four primitives, the fused
convolution variants and one unit per order (forward, forward + backward), each against
eager PyTorch and torch.compile of the eager code, timed with triton.testing.do_bench, with
achieved GB/s, TFLOP/s and the share of the roofline at the GPU's published peaks. Without a
usable GPU it exits with status 2 and names what is missing. Exit status 0 when every row
passes.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional

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


def _parse(argv: Optional[List[str]], prog: str = "python -m fused.check"):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                   help="auto: the backends this machine has (default); all: every backend "
                        "that can run here, the Triton interpreter included")
    p.add_argument("--quick", action="store_true",
                   help="batch norm only, float32, NCHW: a few seconds per backend")
    p.add_argument("--gpu", action="store_true",
                   help="the Triton backend on this machine's CUDA GPU: every order × norm × "
                        "dtype (fp64, fp32, fp16, bf16) × layout × mode, then the timing table; "
                        "exits 2 naming what is missing when there is no usable GPU")
    p.add_argument("--no-timing", action="store_true", help="with --gpu: validation only")
    p.add_argument("--layer", choices=_layer_names(), default=DEFAULT_LAYER,
                   help=f"with --gpu: the layer shape of the timing table (default "
                        f"{DEFAULT_LAYER}; shapes from fused.triton.roofline.LAYERS)")
    p.add_argument("--dtype", choices=tuple(TIMING_DTYPES), default="fp16",
                   help="with --gpu: dtype of the timing table (default fp16)")
    args = p.parse_args(argv)
    if args.gpu and args.backend not in ("auto", "triton"):
        p.error(f"--gpu checks the triton backend, not --backend {args.backend}")
    return args


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
    """Without a GPU the Triton kernels need the interpreter. Returns why Triton cannot run
    here, or None. The interpreter cannot be switched on from inside this process: triton
    reads TRITON_INTERPRET when triton.language defines its own jit helpers, and importing
    fused (torch's custom-op support) has imported it already."""
    if torch.cuda.is_available():
        return None
    from .triton import _common
    if not _common.interpreting():
        return ("no GPU, and Triton's interpreter is off; it must be on before the process "
                "imports triton: rerun as TRITON_INTERPRET=1 python -m fused.check --backend "
                "triton --quick")
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


GPU_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def battery(backend: str, quick: bool, device: Optional[str] = None, dtypes=None,
            orders=None, norms=None, progress: Optional[Callable[[str], None]] = None
            ) -> List[Row]:
    """One Row per conv_impl × dtype × layout × order × norm × mode. `device` defaults to
    cuda for the Triton backend on a GPU machine, else cpu; `dtypes` to float64 and float32
    (plus float16 and bfloat16 on cuda); `progress(description)` is called before each row."""
    from .reference import NORMS, ORDERS
    if device is None:
        device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    impls = ("aten", "triton") if backend == "triton" else ("-",)
    norms = norms or (("bn",) if quick else NORMS)
    if dtypes is None:
        dtypes = [torch.float32] if quick else (
            list(GPU_DTYPES) if torch.device(device).type == "cuda" else
            [torch.float64, torch.float32])
    layouts = [(False, 1)] if quick else [(False, 1), (True, 2)]
    rows = []
    for impl in impls:
        env = {"FUSED_BACKEND": backend}
        if impl != "-":
            env["BNORDER_CONV_IMPL"] = impl
        with _environ(**env):
            for dtype in dtypes:
                for channels_last, stride in layouts:
                    for order in orders or ORDERS:
                        for norm in norms:
                            for training in (True, False):
                                if progress:
                                    progress(f"{backend} {impl} {_SHORT[dtype]} {order} {norm}")
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
# Timing: every primitive, the fused convolution variants and every unit against eager PyTorch
# and torch.compile, with achieved GB/s, TFLOP/s and the share of the roofline
# ----------------------------------------------------------------------------------------

DEFAULT_LAYER = "resnet50.conv2_3x3"   # 64×64×56×56 → 64, 3×3: near the H100's ridge point
TIMING_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PROVIDERS = ("fused", "eager", "compile")

# Kernels each unit runs on the fused-convolution path (fused/triton/README.md, "What each
# pass reads and writes"), as fused.triton.roofline.kernel_cost arguments; the merge kernels
# on (P, C) partials are left out (a few KB). The unit's roofline time is the sum of theirs.
_UNIT_KERNELS = {
    ("conv-to-norm", "fwd"): (("conv_fwd_kernel", dict(stats=True)),
                              ("apply_kernel", dict(norm_side="output"))),
    ("conv-to-norm", "bwd"): (("backward_reduce_kernel", dict(norm_side="output")),
                              ("conv_dgrad_kernel", dict(prologue=1)),
                              ("conv_wgrad_kernel", dict(prologue=1))),
    ("bn-conv-relu", "fwd"): (("stats_partial_kernel", dict(norm_side="input")),
                              ("conv_fwd_kernel", dict(norm_input=True))),
    ("bn-conv-relu", "bwd"): (("conv_dgrad_kernel", dict(prologue=1, reduce=True)),
                              ("conv_wgrad_kernel", dict(prologue=1)),
                              ("backward_apply_kernel", dict(norm_side="input"))),
}


@dataclass
class TimingRow:
    kind: str                      # copy | primitive | conv | unit
    name: str
    seconds: Dict[str, float]      # provider -> median seconds per call
    bytes: float                   # compulsory bytes (fused.triton.roofline)
    flops: float
    bound_s: Optional[float]       # roofline time at the GPU's published peaks; None: unknown GPU
    errors: Dict[str, str] = field(default_factory=dict)   # provider -> why it was not timed

    def achieved(self, provider: str = "fused") -> Optional[tuple]:
        """(GB/s, TFLOP/s) of `provider`, None when it was not timed."""
        t = self.seconds.get(provider)
        return None if t is None else (self.bytes / t / 1e9, self.flops / t / 1e12)

    @property
    def share(self) -> Optional[float]:
        if self.bound_s is None or "fused" not in self.seconds:
            return None
        return self.bound_s / self.seconds["fused"]

    def ratio(self, provider: str) -> Optional[float]:
        """provider time / fused time (> 1: fused is faster)."""
        if provider not in self.seconds or "fused" not in self.seconds:
            return None
        return self.seconds[provider] / self.seconds["fused"]


def _roofline_cost(kernels, layer, dtype, gpu, tf32: bool) -> tuple:
    """(bytes, FLOPs, roofline seconds or None) of a sequence of kernel launches."""
    from .triton import roofline
    total_bytes = total_flops = 0.0
    bound = 0.0
    for kernel, kwargs in kernels:
        cost = roofline.kernel_cost(kernel, layer, dtype, **kwargs)
        total_bytes += cost.bytes
        total_flops += cost.flops
        if gpu is not None:
            bound += roofline.bound_seconds(cost, gpu, dtype, tf32)
    return total_bytes, total_flops, (bound if gpu is not None else None)


def timing_table(layer, dtype: torch.dtype, device: str, timer, *, backend: str = "triton",
                 compiler: Callable = None, gpu_name: Optional[str] = None,
                 providers=PROVIDERS, orders=None, progress=None) -> List[TimingRow]:
    """Time the primitives, the fused convolution variants (Triton backend) and one unit per
    order (forward, forward + backward) at `layer` in `dtype` on `device`, each against eager
    PyTorch and torch.compile of the eager code, with `timer` (fused.timing). `compiler`
    defaults to torch.compile; `gpu_name` (default: fused.timing.device_name) picks the peaks of
    fused.triton.roofline; `progress(description)` is called before each row."""
    import torch.nn.functional as F

    import fused
    from . import _backend, reference
    from .reference import ORDERS
    from .triton import roofline

    if compiler is None:
        def compiler(fn):
            return torch.compile(fn, dynamic=False)
    from .timing import device_name
    gpu_name = gpu_name or device_name(device)
    gpu = roofline.gpu_named(gpu_name)
    tf32 = dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    step = progress or (lambda _description: None)
    rows: List[TimingRow] = []

    def timed(kind, name, fns, kernels):
        step(f"{kind} {name}")
        seconds, errors = {}, {}
        for p, fn in fns.items():
            if p not in providers:
                continue
            try:   # a kernel that fails to compile or launch is a reported row, not a crash
                seconds[p] = timer.seconds(fn)
            except Exception as exc:
                errors[p] = f"{type(exc).__name__}: {exc}"[:160]
        rows.append(TimingRow(kind, name, seconds, *_roofline_cost(kernels, layer, dtype,
                                                                     gpu, tf32), errors))

    gen = torch.Generator(device=device).manual_seed(0)
    t = torch.randn(layer.n, layer.o, layer.p, layer.q, device=device, dtype=dtype,
                    generator=gen)
    g = torch.randn(t.shape, device=device, dtype=dtype, generator=gen)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mean, scale, shift, k1, k2, k3 = (torch.rand(layer.o, device=device, dtype=acc,
                                                 generator=gen) + 0.5 for _ in range(6))

    # The copy row: what a memory-bound kernel can reach on this device (2 A moved).
    copy_bytes = 2 * t.numel() * t.element_size()
    step("copy")
    copy_s = timer.seconds(lambda: t.clone())
    rows.append(TimingRow("copy", "t.clone() (reference)", {"fused": copy_s}, copy_bytes, 0.0,
                          None if gpu is None else copy_bytes / gpu.bandwidth))

    relu = reference.RELU_AFTER
    with _environ(FUSED_BACKEND=backend):
        prims = _backend.primitives(t)
        calls = {
            "stats": (lambda p: p.stats(t, relu), "stats_partial_kernel"),
            "apply": (lambda p: p.apply(t, mean, scale, shift, relu), "apply_kernel"),
            "backward_reduce": (lambda p: p.backward_reduce(g, t, mean, scale, shift, relu),
                                "backward_reduce_kernel"),
            "backward_apply": (lambda p: p.backward_apply(g, t, mean, scale, shift, k1, k2, k3,
                                                          relu), "backward_apply_kernel"),
        }
        for name, (call, kernel) in calls.items():
            eager_fn = getattr(reference, name)
            fns = {"fused": lambda call=call: call(prims),
                   "eager": lambda call=call: call(reference)}
            if "compile" in providers:
                compiled = SimpleNamespace(**{name: compiler(eager_fn)})
                fns["compile"] = lambda call=call, c=compiled: call(c)
            timed("primitive", f"{name} ({prims.name})", fns,
                  [(kernel, dict(norm_side="output"))])

        x = torch.randn(layer.n, layer.c, layer.h, layer.w, device=device, dtype=dtype,
                        generator=gen)
        w = torch.randn(layer.o, layer.c, layer.r, layer.s, device=device, dtype=dtype,
                        generator=gen) * 0.05
        if backend == "triton":
            from .triton import conv as tconv
            geo = ([layer.stride] * 2, [layer.padding] * 2, [1, 1])
            in_scale, in_shift = (torch.rand(layer.c, device=device, dtype=acc,
                                             generator=gen) + 0.5 for _ in range(2))
            for name, kwargs, extra in (
                    ("conv (triton)", {}, {}),
                    ("conv + stats epilogue", {"stats_mode": 1}, {"stats": True}),
                    ("conv + norm prologue", {"in_scale": in_scale, "in_shift": in_shift},
                     {"norm_input": True})):
                timed("conv", name,
                      {"fused": lambda kw=kwargs: tconv.conv_forward(x, w, None, *geo, **kw),
                       "eager": lambda: F.conv2d(x, w, None, layer.stride, layer.padding)},
                      [("conv_fwd_kernel", extra)])

        for order in orders or ORDERS:
            units = {}
            for provider in providers:
                torch.manual_seed(0)
                unit = fused.make_unit(order, layer.c, layer.o, layer.r, layer.stride,
                                       layer.padding, norm="bn",
                                       backend="fused" if provider == "fused" else "eager")
                unit = unit.train().to(device=device)
                unit.conv.to(dtype)  # statistics and gamma/beta stay float32 (DESIGN §2)
                units[provider] = compiler(unit) if provider == "compile" else unit
            xin = x.detach().clone().requires_grad_(True)
            side = "bn-conv-relu" if order == "bn-conv-relu" else "conv-to-norm"
            impl = f" (conv {_backend.conv_impl(x, w, 1)})" if backend == "triton" else ""
            for mode in ("fwd", "fwd+bwd"):
                fns = {p: _unit_step(u, xin, g_out=None if mode == "fwd" else
                                     torch.randn_like(t, dtype=dtype))
                       for p, u in units.items()}
                kernels = _UNIT_KERNELS[(side, "fwd")] + (
                    _UNIT_KERNELS[(side, "bwd")] if mode != "fwd" else ())
                timed("unit", f"{order} {mode}{impl}", fns, kernels)
    return rows


def _unit_step(unit, x, g_out):
    """The training forward of `unit` on x, and with `g_out` also the gradients of x and the
    parameters."""
    params = [p for p in unit.parameters() if p.requires_grad]
    if g_out is None:
        return lambda: unit(x)
    return lambda: torch.autograd.grad(unit(x), [x, *params], g_out)


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


def _print_timing(console, rows: List[TimingRow], layer, dtype: torch.dtype, device_name: str,
                  gpu_known: bool) -> None:
    from rich.table import Table
    table = Table(title=f"Timing on {device_name}: {layer.name} ({layer.describe()}), "
                        f"{_SHORT[dtype]}; median ms per call")
    for col in ("kind", "name", "fused ms", "eager ms", "compile ms", "GB/s", "TFLOP/s",
                "roofline", "eager / fused", "compile / fused"):
        table.add_column(col, justify="left" if col in ("kind", "name") else "right")

    def ms(row, provider):
        return f"{1e3 * row.seconds[provider]:.3f}" if provider in row.seconds else "-"

    def ratio(row, provider):
        r = row.ratio(provider)
        return "-" if r is None else f"{r:.2f}x"

    for r in rows:
        rates = r.achieved()
        table.add_row(r.kind, r.name, ms(r, "fused"), ms(r, "eager"), ms(r, "compile"),
                      "-" if rates is None else f"{rates[0]:.3g}",
                      f"{rates[1]:.3g}" if rates and r.flops else "-",
                      "-" if r.share is None else f"{100 * r.share:.2g}%",
                      ratio(r, "eager"), ratio(r, "compile"))
        for provider, error in r.errors.items():
            table.add_row("", f"[red]{provider} FAILED[/] {error}", *[""] * 8)
    table.caption = (
        "roofline: the time the compulsory bytes and FLOPs (fused.triton.roofline) take at the "
        "GPU's published peaks over the measured fused time; copy row: a clone's share"
        if gpu_known else
        "roofline: no published peaks for this GPU in fused.triton.roofline.GPUS (share not "
        "shown); GB/s and TFLOP/s are achieved figures")
    console.print(table)


def _bar(total: int, what: str):
    """A progress bar on stderr with rate and ETA (tqdm); returns (bar, callback)."""
    from tqdm import tqdm
    bar = tqdm(total=total, desc=what, unit="row", file=sys.stderr, leave=False)

    def step(description: str) -> None:
        bar.set_postfix_str(description, refresh=False)
        bar.update(1)
    return bar, step


def gpu_check(console, device: str = "cuda", timer=None, *, backend: str = "triton",
              quick: bool = False, timing: bool = True, layer=None,
              dtype: torch.dtype = torch.float16, compiler: Callable = None,
              gpu_name: Optional[str] = None, orders=None, norms=None, dtypes=None) -> int:
    """`bnorder check --gpu`: validation of every order × norm × dtype × layout × mode on
    `device` against the float64 reference and eager PyTorch (cuDNN), then the timing table.
    `timer` defaults to fused.timing.bench_timer_for(device); the tests pass device="cpu",
    a CPU backend and fake timers to run this path without a GPU. Returns the exit status."""
    from . import timing as timing_mod
    from .reference import NORMS, ORDERS
    from .triton import roofline
    layer = layer or roofline.LAYERS[DEFAULT_LAYER]
    dtypes = dtypes or ((torch.float32,) if quick else GPU_DTYPES)
    norms = norms or (("bn",) if quick else None)
    count = (len(dtypes) * (1 if quick else 2) * len(orders or ORDERS) *
             len(norms or NORMS) * 2 * (2 if backend == "triton" else 1))
    bar, step = _bar(count, "validation")
    with bar:
        rows = battery(backend, quick, device, dtypes, orders, norms, progress=step)
    _print_rows(console, rows)
    failed = sum(not r.passed for r in rows)
    console.print(f"{len(rows) - failed}/{len(rows)} checks passed")
    if timing:
        timer = timer or timing_mod.bench_timer_for(device)
        gpu_name = gpu_name or timing_mod.device_name(device)
        count = 1 + 4 + (3 if backend == "triton" else 0) + 2 * len(orders or ORDERS)
        bar, step = _bar(count, "timing")
        with bar:
            trows = timing_table(layer, dtype, device, timer, backend=backend,
                                 compiler=compiler, gpu_name=gpu_name, orders=orders,
                                 progress=step)
        _print_timing(console, trows, layer, dtype, gpu_name,
                      roofline.gpu_named(gpu_name) is not None)
        untimed = [r for r in trows if r.errors]
        if untimed:
            console.print(f"[red]{len(untimed)} timing rows failed[/] (see the table)")
            failed += len(untimed)
    return 1 if failed else 0


def main(argv: Optional[List[str]] = None, prog: str = "python -m fused.check") -> int:
    args = _parse(argv, prog)
    from rich.console import Console
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)  # logs and pipes: keep the table readable
    if args.gpu:
        from . import timing
        try:
            timing.require_device("cuda")
        except timing.DeviceUnavailable as e:
            print(f"{prog} --gpu: {e}. The Triton kernels need a CUDA GPU; without one, "
                  f"`TRITON_INTERPRET=1 python -m fused.check --backend triton --quick` runs "
                  f"them in Triton's interpreter.", file=sys.stderr)
            return 2
        return gpu_check(console, "cuda", quick=args.quick, timing=not args.no_timing,
                         layer=_layer(args.layer), dtype=TIMING_DTYPES[args.dtype])
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
    failed = sum(not r.passed for r in rows)
    console.print(f"{len(rows) - failed}/{len(rows)} checks passed")
    if ("triton" in backends and "triton" not in blocked and torch.cuda.is_available()
            and not args.no_timing):
        console.print("timing table: `bnorder check --gpu`")
    return 1 if failed else 0


def _layer(name: str):
    from .triton import roofline
    return roofline.LAYERS[name]


def _layer_names():
    from .triton import roofline
    return tuple(roofline.LAYERS)


if __name__ == "__main__":
    sys.exit(main())
