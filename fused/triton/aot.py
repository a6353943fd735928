"""Ahead-of-time compilation of every Triton kernel variant the ops launch, for sm_80 (A100)
and sm_90 (H100/H200), without a GPU:

    python -m fused.triton.aot [--arch sm_80,sm_90] [--jobs 2] [--layers resnet20.stage1,...]

Where the variants come from: the launchers themselves. The op entry points (ops.py's four
order ops and primitives.py's four BN primitives, which between them call every launcher) run
on meta tensors at the layer shapes of roofline.LAYERS (plus classifier and odd shapes that
reach the smallest blocks), for every dtype, memory format, ReLU mode, norm, training and
eval, bias or not, and IEEE/TF32 float32 dots. While they run, every kernel object of
conv_kernels / norm_kernels is replaced by a recorder, so what is recorded is exactly the
(kernel, arguments, block sizes, num_warps, num_stages) that the launch code chooses on a
GPU; a new kernel, flag or block rule in a launcher shows up here without a second list.
Launches that compile to the same binary (same signature, specialization and constexprs)
are compiled once.

Each variant is compiled with triton.compile(ASTSource(...), target=GPUTarget("cuda", arch,
32)) in a process pool (ptxas ships inside the triton wheel), into a fresh cache directory
that is deleted afterwards: nothing is reused between runs. The table gives registers per
thread, spill stores, shared memory, warps, stages, the tensor-core instruction, compile time,
and the paper roofline (roofline.py) at the variant's first layer shape: **compiled, not run**.

Exit status 1 on any compile error, any register spill, or shared memory over the target's
per-block limit (227 KB on sm_90, 163 KB on sm_80).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from . import _common, conv_kernels, norm_kernels, roofline

KERNEL_MODULES = (conv_kernels, norm_kernels)

# Largest shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = {"sm_80": 80, "sm_90": 90}

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
LAYOUTS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}

# Shapes beyond roofline.LAYERS that reach the launchers' other branches: the classifier
# units (H = W = 1, the `1 × N·H·W × C` geometry; few output channels) and single-channel
# inputs (the smallest channel blocks).
EXTRA_LAYERS = (
    roofline.Layer("resnet20.fc", 128, 64, 1, 1, 10, 1, 1, 1, 0),
    roofline.Layer("vgg16.fc2", 64, 4096, 1, 1, 4096, 1, 1, 1, 0),
    roofline.Layer("cnn.conv1", 128, 1, 28, 28, 32, 3, 3, 1, 1),
)


def _is_jit(value) -> bool:
    """A @triton.jit function: a JITFunction, or under TRITON_INTERPRET its interpreter
    stand-in."""
    from triton.runtime.jit import JITFunction, KernelInterface
    return isinstance(value, JITFunction) or (isinstance(value, KernelInterface)
                                              and hasattr(value, "fn"))


def jit_kernels() -> Dict[str, object]:
    """Every @triton.jit function of the kernel modules, by name (helpers included)."""
    found = {}
    for module in KERNEL_MODULES:
        for name, value in vars(module).items():
            if _is_jit(value) and value.fn.__module__ == module.__name__:
                found[name] = value
    return found


def package_jit_functions() -> Dict[str, str]:
    """Every @triton.jit function defined anywhere in fused.triton: {name: module}. The
    coverage test compares it with what the sweep compiles."""
    import importlib
    import pkgutil

    import fused.triton as package
    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, value in vars(module).items():
            if _is_jit(value) and value.fn.__module__ == module.__name__:
                found[name] = module.__name__
    return found


def called_helpers(kernel_names: Iterable[str]) -> set:
    """The @triton.jit helpers these kernels call, directly or through other helpers
    (read from the source: a helper is compiled into every kernel that calls it)."""
    import inspect
    functions = jit_kernels()
    seen, todo = set(), list(kernel_names)
    while todo:
        source = inspect.getsource(functions[todo.pop()].fn)
        for name in functions:
            if name not in seen and re.search(rf"\b{name}\(", source):
                seen.add(name)
                todo.append(name)
    return seen - set(kernel_names)


def launched_kernels() -> List[str]:
    """The JIT functions a launcher calls with a grid: those named *_kernel."""
    return sorted(name for name in jit_kernels() if name.endswith("_kernel"))


# ---------------------------------------------------------------------------------------
# Recording the launches
# ---------------------------------------------------------------------------------------

@dataclass
class Launch:
    kernel: str
    module: str
    args: tuple
    kwargs: dict
    context: str          # op, layer, dtype, layout: where it was launched from
    layer: roofline.Layer
    dtype: torch.dtype
    tf32: bool


class _Recorder:
    def __init__(self, name: str, module: str, sink: list, where: dict):
        self.name, self.module, self.sink, self.where = name, module, sink, where

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.name, self.module, args, kwargs, **dict(self.where)))
        return launch


@contextlib.contextmanager
def recording(sink: list, where: dict):
    """Launches go to `sink` instead of a GPU; meta tensors take the GPU launch parameters."""
    saved = []
    names = launched_kernels()
    for module in KERNEL_MODULES:
        for name in names:
            if hasattr(module, name):
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, _Recorder(name, module.__name__, sink, where))
    flag = _common.RECORDING_META_AS_CUDA
    _common.RECORDING_META_AS_CUDA = True
    try:
        yield
    finally:
        _common.RECORDING_META_AS_CUDA = flag
        for module, name, kernel in saved:
            setattr(module, name, kernel)


def _tensor(shape, dtype, layout=torch.contiguous_format):
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.contiguous(memory_format=layout) if len(shape) == 4 else t


def _op_calls(layer: roofline.Layer, dtype: torch.dtype, layout) -> Iterable[Tuple[str, callable]]:
    """(description, thunk) for every op call the fused units make at this layer."""
    from .. import _conv_then_norm
    from ..reference import RELU_AFTER, RELU_BEFORE, RELU_NONE
    from . import ops, primitives

    acc = _common.acc_dtype(_tensor((1,), dtype))
    x = _tensor((layer.n, layer.c, layer.h, layer.w), dtype, layout)
    weight = _tensor((layer.o, layer.c, layer.r, layer.s), dtype, layout)
    y = _tensor((layer.n, layer.o, layer.p, layer.q), dtype, layout)
    geometry = ([layer.stride] * 2, [layer.padding] * 2, [1, 1])

    def vec(c, dt=acc):
        return _tensor((c,), dt)

    def saved_stats(c, batch_stats):
        dt = torch.float64 if batch_stats else acc
        return vec(c, dt), vec(c, dt)

    for norm, relu_mode, bias, training in itertools.product(
            ("bn", "bn-minus", "affine"), (RELU_NONE, RELU_AFTER, RELU_BEFORE), (False, True),
            (True, False)):
        b = vec(layer.o, dtype) if bias else None
        stats_in = (None, None) if training else (vec(layer.o), vec(layer.o))
        batch_stats = norm != "affine" and stats_in[0] is None
        # A norm scale that trains (the affine norm in training) does not fold.
        folds = _conv_then_norm._folds(batch_stats, relu_mode,
                                       vec(layer.o, dtype).requires_grad_(training))
        what = f"conv→{norm} relu{relu_mode} {'train' if training else 'eval'}" + (
            " bias" if bias else "")
        yield what + " fwd", lambda b=b, s=stats_in, f=folds, n=norm, r=relu_mode: (
            ops.conv_norm_forward(x, weight, b, *geometry, vec(layer.o, dtype),
                                  vec(layer.o, dtype), *s, 1e-5, n, r, f))
        # The backward gets what the forward saved: float64 batch statistics, or the running
        # ones (acc dtype); either is rounded to the acc dtype before any launch.
        yield what + " bwd", lambda b=b, f=folds, n=norm, r=relu_mode, bs=batch_stats: (
            ops.conv_norm_backward(y, x, weight, b, y, y, *saved_stats(layer.o, bs),
                                   vec(layer.o, dtype), vec(layer.o, dtype), *geometry, 1e-5,
                                   n, r, bs, [True, True, b is not None], f))
    for norm, relu, bias, training in itertools.product(
            ("bn", "bn-minus", "affine"), (False, True), (False, True), (True, False)):
        b = vec(layer.o, dtype) if bias else None
        stats_in = (None, None) if training else (vec(layer.c), vec(layer.c))
        batch_stats = norm != "affine" and stats_in[0] is None
        what = f"{norm}→conv relu{int(relu)} {'train' if training else 'eval'}" + (
            " bias" if bias else "")
        yield what + " fwd", lambda b=b, s=stats_in, n=norm, r=relu: ops.norm_conv_forward(
            x, weight, b, *geometry, vec(layer.c, dtype), vec(layer.c, dtype), *s, 1e-5, n, r)
        yield what + " bwd", lambda b=b, n=norm, r=relu, bs=batch_stats: ops.norm_conv_backward(
            y, x, y, weight, *saved_stats(layer.c, bs), vec(layer.c, dtype),
            vec(layer.c, dtype), *geometry, 1e-5, n, r, bs, [True, True, b is not None])
    # The ATen-convolution path: the four primitives on the tensor the norm sees.
    for t, side in ((y, "output"), (x, "input")):
        c = t.shape[1]
        for mode in (RELU_NONE, RELU_AFTER, RELU_BEFORE):
            yield f"stats {side} relu{mode}", lambda t=t, m=mode: primitives.stats(t, m)
            yield f"apply {side} relu{mode}", lambda t=t, m=mode, c=c: primitives.apply(
                t, vec(c), vec(c), vec(c), m)
            yield f"backward_reduce {side} relu{mode}", lambda t=t, m=mode, c=c: (
                primitives.backward_reduce(t, t, vec(c), vec(c), vec(c), m))
            yield f"backward_apply {side} relu{mode}", lambda t=t, m=mode, c=c: (
                primitives.backward_apply(t, t, *(vec(c) for _ in range(6)), m))


def record_launches(layers: Sequence[roofline.Layer]) -> List[Launch]:
    """Every launch the ops make at these layers, dtypes, layouts and float32 dot modes."""
    sink: List[Launch] = []
    where: dict = {}
    saved_tf32 = torch.backends.cudnn.allow_tf32
    try:
        with recording(sink, where):
            for layer, dtype, (layout_name, layout) in itertools.product(layers, DTYPES,
                                                                          LAYOUTS.items()):
                for tf32 in ((False, True) if dtype == torch.float32 else (False,)):
                    torch.backends.cudnn.allow_tf32 = tf32
                    for what, call in _op_calls(layer, dtype, layout):
                        where.update(context=f"{what} {layout_name}", layer=layer,
                                     dtype=dtype, tf32=tf32)
                        call()
    finally:
        torch.backends.cudnn.allow_tf32 = saved_tf32
    return sink


# ---------------------------------------------------------------------------------------
# Binding: the signature, specialization and constexprs triton.jit would compile
# ---------------------------------------------------------------------------------------

def _backend(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    return make_backend(GPUTarget("cuda", arch, 32))


def bind(launch: Launch, arch: int) -> Tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) exactly as JITFunction.run derives them
    (integer 1 → constexpr, 16-divisible integers and pointers → divisibility hints)."""
    from triton.runtime.jit import create_function_from_signature
    kernel = jit_kernels()[launch.kernel]
    backend = _backend(arch)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    _, signature, constexprs, attrs = kernel._pack_args(backend, options, bound,
                                                        specialization, options)
    return signature, constexprs, attrs, dict(options)


def _constexpr_text(kernel_name: str, constexprs: dict) -> str:
    kernel = jit_kernels()[kernel_name]
    names = [p.name for p in kernel.params]
    shown = []
    for path, value in sorted(constexprs.items()):
        name = names[path[0]]
        if kernel.params[path[0]].is_constexpr:
            shown.append(f"{name}={value}")
    return " ".join(shown)


@dataclass
class Variant:
    kernel: str
    module: str
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    launches: List[Launch] = field(default_factory=list)

    @property
    def dtype_text(self) -> str:
        first = self.launches[0]
        return str(first.dtype).replace("torch.", "") + (" tf32" if first.tf32 else "")

    @property
    def text(self) -> str:
        specialized = sum(1 for p in self.constexprs
                          if not jit_kernels()[self.kernel].params[p[0]].is_constexpr)
        return (f"{self.dtype_text} {_constexpr_text(self.kernel, self.constexprs)}"
                f"{f' ({specialized} ints = 1)' if specialized else ''}")


def _binding_key(launch: Launch) -> tuple:
    """What JITFunction's specialization looks at: pointer dtypes, integers' = 1 and
    16-divisibility, constexpr values (data pointers: torch allocations are 16-aligned)."""
    args = tuple(str(v.dtype) if isinstance(v, torch.Tensor) else
                 (v == 1, v % 16 == 0) if isinstance(v, int) and not isinstance(v, bool) else
                 repr(v) for v in launch.args)
    return launch.kernel, args, tuple(sorted(launch.kwargs.items()))


def variants(launches: Sequence[Launch], archs: Sequence[int]) -> List[Variant]:
    """Launches grouped by what the compiler sees; one Variant per (binary, arch)."""
    out: Dict[tuple, Variant] = {}
    bound: Dict[tuple, tuple] = {}
    for launch in launches:
        for arch in archs:
            cheap = (_binding_key(launch), arch)
            if cheap in bound:
                out[bound[cheap]].launches.append(launch)
                continue
            signature, constexprs, attrs, options = bind(launch, arch)
            key = (launch.kernel, arch, tuple(sorted(signature.items())),
                   repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
                   repr(sorted(options.items())))
            if key not in out:
                out[key] = Variant(launch.kernel, launch.module, arch, signature, constexprs,
                                   attrs, options)
            out[key].launches.append(launch)
            bound[cheap] = key
    return list(out.values())


def _layout(launch: Launch) -> str:
    """The memory layout a launch was recorded under (the last word of its context)."""
    return launch.context.rsplit(" ", 1)[-1]


def _kwargs_items(variant: Variant) -> set:
    return {(k, v) for k, v in variant.launches[0].kwargs.items()} | {
        ("dtype", variant.dtype_text),
        ("layout", _layout(variant.launches[0]))}


def _weight(variant: Variant) -> tuple:
    """Larger tiles and more fused work first: the variants most likely to spill."""
    kw = variant.launches[0].kwargs
    volume = 1
    for k, v in kw.items():
        if k.startswith("BLOCK_"):
            volume *= v
    work = sum(1 for k, v in kw.items() if not k.startswith("BLOCK_") and v not in (0, False))
    return volume, kw.get("R", 1) * kw.get("S", 1), work


def by_launch_parameters(launches: Sequence[Launch], archs: Sequence[int]) -> List[Variant]:
    """Launches grouped by kernel, keyword arguments, dtype and layout, not yet bound (the
    integer specializations inside a group are not told apart): what --quick selects from
    without paying for the binding of every launch."""
    out: Dict[tuple, Variant] = {}
    for launch in launches:
        for arch in archs:
            key = (launch.kernel, arch, tuple(sorted(launch.kwargs.items())), launch.dtype,
                   launch.tf32, _layout(launch))
            if key not in out:
                out[key] = Variant(launch.kernel, launch.module, arch, {}, {}, {}, {})
            out[key].launches.append(launch)
    return list(out.values())


def bound(variant: Variant) -> Variant:
    """The variant with the signature, constexprs and attributes of its first launch."""
    signature, constexprs, attrs, options = bind(variant.launches[0], variant.arch)
    return Variant(variant.kernel, variant.module, variant.arch, signature, constexprs, attrs,
                   options, list(variant.launches))


def quick_subset(todo: Sequence[Variant]) -> List[Variant]:
    """A covering subset for CI: per kernel and target, the heaviest variant of every dtype
    and memory layout (a layout decides which vectors a tile broadcasts), then, greedily,
    variants until every value of every launch parameter (block sizes,
    kernel taps, flags, dtype, layout) has been compiled at least once."""
    chosen: List[Variant] = []
    groups: Dict[tuple, List[Variant]] = {}
    for v in todo:
        groups.setdefault((v.kernel, v.arch), []).append(v)
    for _, group in sorted(groups.items()):
        group = sorted(group, key=_weight, reverse=True)
        picked = {}
        for v in group:
            picked.setdefault((v.dtype_text, _layout(v.launches[0])), v)
        picked = list(picked.values())
        covered = set().union(*(_kwargs_items(v) for v in picked))
        wanted = set().union(*(_kwargs_items(v) for v in group))
        while covered != wanted:
            best = max(group, key=lambda v: (len(_kwargs_items(v) - covered), _weight(v)))
            picked.append(best)
            covered |= _kwargs_items(best)
        chosen.extend(picked)
    return chosen


# ---------------------------------------------------------------------------------------
# Compiling
# ---------------------------------------------------------------------------------------

@dataclass
class Result:
    regs: Optional[int] = None
    spill_stores: int = 0
    spill_loads: int = 0
    shared: Optional[int] = None
    num_warps: Optional[int] = None
    num_stages: Optional[int] = None
    mma: str = ""
    seconds: float = 0.0
    error: Optional[str] = None


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_variant(module: str, kernel_name: str, arch: int, signature: dict,
                    constexprs: dict, attrs: dict, options: dict) -> Result:
    """Compile one variant (runs in a worker process); ptxas's -v log gives registers and
    spills, Triton's metadata the shared memory."""
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    kernel = getattr(importlib.import_module(module), kernel_name)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # every compile error is reported in the table, not raised
        first = str(e).strip().splitlines()
        return Result(seconds=time.perf_counter() - start,
                      error=f"{type(e).__name__}: {first[0] if first else ''}"[:300])
    seconds = time.perf_counter() - start
    text = log.getvalue()
    regs = _PTXAS_REGS.search(text)
    spills = _PTXAS_SPILLS.search(text)
    if regs is None or spills is None:
        return Result(seconds=seconds, error="no ptxas -v report in the compile log")
    ptx = compiled.asm.get("ptx", "")
    mma = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "")
    meta = compiled.metadata
    return Result(int(regs.group(1)), int(spills.group(1)), int(spills.group(2)), meta.shared,
                  meta.num_warps, meta.num_stages, mma, seconds)


def _submit(pool, variant: Variant):
    return pool.submit(compile_variant, variant.module, variant.kernel, variant.arch,
                       variant.signature, variant.constexprs, variant.attrs, variant.options)


def compile_all(todo: Sequence[Variant], jobs: int, progress=None) -> List[Result]:
    """Results in `todo`'s order. A compiler crash (LLVM abort) breaks the pool: the
    unfinished variants are retried, and one that breaks a single-worker pool is reported
    as crashed."""
    results: Dict[int, Result] = {}
    pending = list(range(len(todo)))
    workers = jobs
    while pending:
        broken = []
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {_submit(pool, todo[i]): i for i in pending}
            for future in as_completed(futures):
                i = futures[future]
                try:
                    results[i] = future.result()
                    if progress is not None:
                        progress()
                except BrokenProcessPool:
                    broken.append(i)
        if broken and workers == 1 and len(broken) == len(pending):
            results[broken[0]] = Result(error="the compiler process crashed (LLVM abort?)")
            if progress is not None:
                progress()
            broken = broken[1:]
        pending = sorted(broken)
        workers = 1 if broken else workers
    return [results[i] for i in range(len(todo))]


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------

def problems(variant: Variant, result: Result) -> List[str]:
    found = []
    if result.error:
        found.append("error")
    if result.spill_stores or result.spill_loads:
        found.append("spills")
    if result.shared is not None and result.shared > SHARED_LIMIT[variant.arch]:
        found.append("shared memory")
    return found


def _roofline_cells(variant: Variant) -> Tuple[str, str, str]:
    launch = variant.launches[0]
    flags = variant.launches[0].kwargs
    try:
        cost = roofline.kernel_cost(
            variant.kernel, launch.layer, launch.dtype,
            norm_side="input" if " input " in launch.context or "→conv" in launch.context
            else "output",
            prologue=flags.get("PROLOGUE", 0), reduce=bool(flags.get("REDUCE", False)),
            stats=bool(flags.get("STATS", 0)), norm_input=bool(flags.get("NORM_INPUT", False)))
    except KeyError:
        return "", "", ""
    gpu = roofline.GPUS["H100" if variant.arch == 90 else "A100"]
    seconds = roofline.bound_seconds(cost, gpu, launch.dtype, launch.tf32)
    return (f"{cost.bytes / 1e6:.1f} MB", f"{cost.flops / 1e9:.2f} GF",
            f"{seconds * 1e6:.1f} µs {roofline.bound_by(cost, gpu, launch.dtype, launch.tf32)[:3]}"
            f" ({gpu.name})")


def table(pairs: Sequence[Tuple[Variant, Result]], only_problems: bool = False):
    from rich.table import Table
    t = Table(title="Triton kernels compiled ahead of time (compiled, not run)")
    for col in ("kernel", "variant", "target", "regs", "spills st/ld B", "shared KB", "warps",
                "stages", "mma", "compile s", "layer", "bytes", "FLOPs", "roofline"):
        t.add_column(col, justify="right" if col in ("regs", "shared KB", "warps", "stages",
                                                       "compile s", "bytes", "FLOPs") else "left",
                     overflow="fold")
    for variant, result in pairs:
        bad = problems(variant, result)
        if only_problems and not bad:
            continue
        style = "red" if bad else None
        if result.error:
            t.add_row(variant.kernel, variant.text, f"sm_{variant.arch}", "", "", "", "", "",
                      "", f"{result.seconds:.1f}", variant.launches[0].layer.name,
                      "", "", result.error, style=style)
            continue
        t.add_row(variant.kernel, variant.text, f"sm_{variant.arch}", str(result.regs),
                  f"{result.spill_stores}/{result.spill_loads}",
                  f"{result.shared / 1024:.1f}", str(result.num_warps), str(result.num_stages),
                  result.mma, f"{result.seconds:.1f}", variant.launches[0].layer.name,
                  *_roofline_cells(variant), style=style)
    return t


def summary(pairs: Sequence[Tuple[Variant, Result]]) -> Dict[str, int]:
    counts = {"variants": len(pairs), "errors": 0, "spills": 0, "shared memory": 0}
    for variant, result in pairs:
        for problem in problems(variant, result):
            key = "errors" if problem == "error" else problem
            counts[key] += 1
    return counts


def _parse_archs(text: str) -> List[int]:
    archs = []
    for item in text.split(","):
        item = item.strip()
        if item not in ARCHS:
            raise argparse.ArgumentTypeError(
                f"unknown target {item!r}: expected a comma-separated list of {sorted(ARCHS)}")
        archs.append(ARCHS[item])
    return archs


def _parse_layers(text: str) -> List[roofline.Layer]:
    known = {**roofline.LAYERS, **{layer.name: layer for layer in EXTRA_LAYERS}}
    chosen = []
    for item in text.split(","):
        if item.strip() not in known:
            raise argparse.ArgumentTypeError(f"unknown layer {item!r}: choose from "
                                             f"{', '.join(sorted(known))}")
        chosen.append(known[item.strip()])
    return chosen


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused.triton.aot",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=_parse_archs, default=[80, 90],
                        help="comma-separated targets (default sm_80,sm_90)")
    parser.add_argument("--layers", type=_parse_layers, default=None,
                        help="comma-separated layer names (default: all of roofline.LAYERS "
                             "and the extra classifier/odd shapes)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compiler processes (default: one per CPU)")
    parser.add_argument("--quick", action="store_true",
                        help="compile a covering subset (the heaviest variant per dtype and "
                             "layout, then "
                             "every launch-parameter value at least once): the CI check")
    parser.add_argument("--all-rows", action="store_true",
                        help="print every variant (default: problems, then a summary per "
                             "kernel)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if _common.interpreting():
        parser.error("TRITON_INTERPRET is set: the kernels are interpreter functions and "
                     "cannot be compiled; run without it")

    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    import triton

    console = Console(width=max(Console().width, 160))
    layers = args.layers or [*roofline.LAYERS.values(), *EXTRA_LAYERS]
    launches = record_launches(layers)
    targets = ", ".join(f"sm_{a}" for a in args.arch)
    if args.quick:
        groups = by_launch_parameters(launches, args.arch)
        todo = [bound(v) for v in quick_subset(groups)]
        found = (f"{len(groups)} distinct launch parameter sets for {targets}; compiling the "
                 f"covering subset of {len(todo)}")
    else:
        todo = variants(launches, args.arch)
        found = f"{len(todo)} distinct compiles for {targets}"
    console.print(f"triton {triton.__version__}: {len(launches)} launches recorded at "
                  f"{len(layers)} layer shapes → {found}")
    cache = tempfile.mkdtemp(prefix="bnorder-aot-")
    os.environ["TRITON_CACHE_DIR"] = cache
    start = time.perf_counter()
    try:
        with Progress(TextColumn("compiling"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=console, transient=True) as bar:
            task = bar.add_task("compile", total=len(todo), rate="")

            def step():
                done = bar.tasks[0].completed + 1
                elapsed = time.perf_counter() - start
                bar.update(task, advance=1, rate=f"{done / elapsed:.2f} variants/s")

            results = compile_all(todo, args.jobs, step)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    elapsed = time.perf_counter() - start
    pairs = sorted(zip(todo, results), key=lambda p: (p[0].kernel, p[0].arch, p[0].text))
    counts = summary(pairs)
    bad = counts["errors"] + counts["spills"] + counts["shared memory"]
    if args.all_rows or bad:
        console.print(table(pairs, only_problems=not args.all_rows))
    console.print(per_kernel_table(pairs))
    console.print(f"{counts['variants']} variants compiled in {elapsed:.0f} s with "
                  f"{args.jobs} processes: {counts['errors']} compile errors, "
                  f"{counts['spills']} with spills, {counts['shared memory']} over the shared "
                  f"memory limit")
    return 1 if bad else 0


def per_kernel_table(pairs: Sequence[Tuple[Variant, Result]]):
    """One row per kernel and target: the worst variant's figures, and the roofline at the
    kernel's largest stated layer."""
    from rich.table import Table
    t = Table(title="Per kernel and target: worst variant (compiled, not run)")
    for col in ("kernel", "target", "variants", "max regs", "max spills B", "max shared KB",
                "warps", "stages", "mma", "compile s", "roofline at largest layer"):
        t.add_column(col, overflow="fold")
    groups: Dict[Tuple[str, int], List[Tuple[Variant, Result]]] = {}
    for variant, result in pairs:
        groups.setdefault((variant.kernel, variant.arch), []).append((variant, result))
    for (kernel, arch), group in sorted(groups.items()):
        ok = [(v, r) for v, r in group if not r.error]
        if not ok:
            t.add_row(kernel, f"sm_{arch}", str(len(group)), "", "", "", "", "", "",
                      "", "all failed", style="red")
            continue
        largest = max(ok, key=lambda p: p[0].launches[0].layer.y_elems)
        cells = _roofline_cells(largest[0])
        t.add_row(kernel, f"sm_{arch}", str(len(group)),
                  str(max(r.regs for _, r in ok)),
                  str(max(r.spill_stores for _, r in ok)),
                  f"{max(r.shared for _, r in ok) / 1024:.1f}",
                  "/".join(str(w) for w in sorted({r.num_warps for _, r in ok})),
                  "/".join(str(s) for s in sorted({r.num_stages for _, r in ok})),
                  "/".join(sorted({r.mma for _, r in ok if r.mma})) or "-",
                  f"{sum(r.seconds for _, r in group):.0f}",
                  f"{largest[0].launches[0].layer.name}: {cells[0]}, {cells[2]}" if cells[0]
                  else "-",
                  style="red" if any(problems(v, r) for v, r in group) else None)
    return t


if __name__ == "__main__":
    sys.exit(main())
