"""What the benchmarks run, independent of any timing harness: the unit shapes of the
networks, one unit's or one network's step for a provider, the bytes-moved model and the
memory probes (saved-for-backward bytes, peak live bytes).

Providers: `eager` (plain torch modules), `fused` (this package), `compile` (torch.compile of
the eager module, static shapes, compiled afresh per case), for the networks `compile-fused`
(torch.compile of the fused module: do the fused ops leave inductor free to fuse the rest of
the network?), and for the units `conv+relu`,
the eager unit with an empty norm slot: the floor a fused unit can reach on CPU, where the
convolution stays in ATen.

Every builder takes the `device` its modules and tensors live on ("cpu" or "cuda"; the suites
pass `--device`). On CUDA the fused provider runs the Triton backend.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import fused
import models
from models import units_of

BATCH = 128            # as in training
NETWORKS = ("alexnet", "vgg16", "resnet20")
PROVIDERS = ("eager", "fused", "compile")
NETWORK_PROVIDERS = PROVIDERS + ("compile-fused",)
FLOOR = "conv+relu"
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


@dataclass(frozen=True)
class UnitShape:
    """One distinct unit of a network: conv geometry and input side; `count` units of the
    network have it and they carry `mac_share` of the network's unit MACs."""
    net: str
    cin: int
    cout: int
    kernel: int
    stride: int
    padding: int
    size: int
    count: int = 1
    mac_share: float = 1.0

    @property
    def out_size(self) -> int:
        return (self.size + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def label(self) -> str:
        stride = f"s{self.stride}" if self.stride > 1 else ""
        return f"{self.net}-{self.cin}to{self.cout}k{self.kernel}{stride}-{self.size}px"

    def numel(self, batch: int) -> Tuple[int, int, int]:
        """Elements of the unit's input, output and conv weight."""
        return (batch * self.cin * self.size ** 2, batch * self.cout * self.out_size ** 2,
                self.cout * self.cin * self.kernel ** 2)


def network_shapes(name: str) -> List[UnitShape]:
    """The distinct unit shapes of network `name` (32×32 input), in network order, found
    with pre-hooks on a meta-device copy."""
    with torch.device("meta"):
        model = models.build(name, "conv-bn-relu", "bn", "eager")
    seen: Dict[tuple, int] = {}

    def hook(unit, inputs):
        c = unit.conv
        key = (c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0],
               inputs[0].shape[-1])
        seen[key] = seen.get(key, 0) + 1

    hooks = [u.register_forward_pre_hook(hook) for _, u in units_of(model)]
    with torch.no_grad():
        model(torch.empty(2, 3, models.input_size(name), models.input_size(name),
                          device="meta"))
    for h in hooks:
        h.remove()
    shapes = [UnitShape(name, *key, count=n) for key, n in seen.items()]
    macs = {s: s.count * s.numel(1)[1] * s.cin * s.kernel ** 2 for s in shapes}
    total = sum(macs.values())
    return [UnitShape(name, s.cin, s.cout, s.kernel, s.stride, s.padding, s.size, s.count,
                      macs[s] / total) for s in shapes]


def main_shapes(name: str, coverage: float = 0.9) -> List[UnitShape]:
    """The fewest distinct shapes that carry `coverage` of the network's unit MACs (the
    shapes whose time decides the step time), in network order."""
    shapes = network_shapes(name)
    kept, covered = set(), 0.0
    for s in sorted(shapes, key=lambda s: -s.mac_share):
        if covered >= coverage:
            break
        kept.add(s)
        covered += s.mac_share
    return [s for s in shapes if s in kept]


# ---------------------------------------------------------------------------- steps

def build_unit(order: str, cin: int, cout: int, norm: str, backend: str, fmt,
               kernel: int = 3, stride: int = 1, padding: int = 1,
               device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    unit = fused.make_unit(order, cin, cout, kernel, stride, padding, norm=norm,
                           backend=backend)
    return unit.train().to(device=device, memory_format=fmt)


def make_step(module: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], object]:
    """`fwd`: the training forward (x requires grad, so everything backward needs is
    saved); `fwdbwd`: forward and the gradients of x and the parameters."""
    params = [p for p in module.parameters() if p.requires_grad]
    grad = None

    def forward():
        return module(x)

    def forward_backward():
        nonlocal grad
        out = module(x)
        if grad is None:
            grad = torch.randn_like(out)
        torch.autograd.grad(out, [x, *params], grad)

    return forward if mode == "fwd" else forward_backward


def compiled(module: nn.Module) -> nn.Module:
    """torch.compile with static shapes and an empty dynamo cache, so that no case inherits
    another's guards, recompile budget or dynamic dims."""
    torch._dynamo.reset()
    return torch.compile(module, dynamic=False)


def unit_steps(shape: UnitShape, order: str, norm: str, provider: str, fmt_name: str,
               modes, batch: int = BATCH, device: str = "cpu",
               sync: Callable[[], None] = lambda: None
               ) -> Tuple[Dict[str, Callable], float | None]:
    """{mode: step} of one provider on one input, and the compile time in seconds (the
    first call of every mode, made here, then `sync`: the device's synchronize) for
    `compile`."""
    fmt = FORMATS[fmt_name]
    torch.manual_seed(1)
    x = torch.randn(batch, shape.cin, shape.size, shape.size, device=device)
    x = x.contiguous(memory_format=fmt).requires_grad_()
    backend = "fused" if provider == "fused" else "eager"
    module = build_unit(order, shape.cin, shape.cout, "none" if provider == FLOOR else norm,
                        backend, fmt, shape.kernel, shape.stride, shape.padding, device)
    compile_s = None
    if provider == "compile":
        module = compiled(module)
    steps = {mode: make_step(module, x, mode) for mode in modes}
    if provider == "compile":
        start = time.perf_counter()
        for step in steps.values():
            step()
        sync()
        compile_s = time.perf_counter() - start
    return steps, compile_s


def build_network(name: str, order: str, norm: str, backend: str, fmt_name: str = "nchw",
                  device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    model = models.build(name, order, norm, backend).train()
    return model.to(device=device, memory_format=FORMATS[fmt_name])


def network_batch(name: str, batch: int = BATCH, fmt_name: str = "nchw", device: str = "cpu"):
    torch.manual_seed(1)
    size = models.input_size(name)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=FORMATS[fmt_name])
    return x.to(device), torch.randint(0, 10, (batch,)).to(device)


def network_step(name: str, order: str, norm: str, provider: str, batch: int = BATCH,
                 fmt_name: str = "nchw", device: str = "cpu",
                 sync: Callable[[], None] = lambda: None
                 ) -> Tuple[Callable[[], None], float | None]:
    """One SGD training step (forward, cross-entropy, backward, momentum SGD) and, for
    `compile` and `compile-fused`, the compile time (the first step, made here, then `sync`).
    The learning rate is tiny so that repeated steps on one batch neither diverge nor hit
    denormals."""
    if provider not in NETWORK_PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; expected one of "
                         f"{', '.join(NETWORK_PROVIDERS)}")
    is_compiled = provider.startswith("compile")
    model = build_network(name, order, norm, "fused" if provider.endswith("fused") else "eager",
                          fmt_name, device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    forward = compiled(model) if is_compiled else model
    x, target = network_batch(name, batch, fmt_name, device)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x), target).backward()
        opt.step()

    compile_s = None
    if is_compiled:
        start = time.perf_counter()
        step()
        sync()
        compile_s = time.perf_counter() - start
    return step, compile_s


# ---------------------------------------------------------------------------- bytes

# DESIGN §4, in activation tensors (N·C·H·W elements) of the tensor the norm sees,
# norm + ReLU side only: (forward, backward). torch.compile is credited with the fused
# two-pass figures (inductor makes the same two passes); with an empty slot only the
# ReLU is left: read + write forward, read g and the mask + write backward.
BN_SIDE = {"eager": (5, 8), FLOOR: (2, 3), "fused": (3, 5), "compile": (3, 5),
           "compile-fused": (3, 5)}
RELU_SIDE = (2, 3)


def unit_bytes(shape: UnitShape, order: str, norm: str, provider: str, mode: str,
               batch: int = BATCH, itemsize: int = 4) -> int:
    """Bytes a unit moves: the BN side from DESIGN §4's table plus the convolution's input,
    output and weight (forward: read x and W, write y; backward: dgrad reads dy and W and
    writes dx, wgrad reads dy and x and writes dW)."""
    x, y, w = shape.numel(batch)
    t = x if order == "bn-conv-relu" else y
    side = RELU_SIDE if norm == "none" or provider == FLOOR else BN_SIDE[provider]
    elems = x + y + w + side[0] * (t if norm != "none" and provider != FLOOR else y)
    if mode != "fwd":
        elems += 2 * y + 2 * x + 2 * w
        elems += side[1] * (t if norm != "none" and provider != FLOOR else y)
    return elems * itemsize


def unit_working_set(shape: UnitShape, mode: str, batch: int = BATCH, itemsize: int = 4
                     ) -> int:
    """Bytes of the distinct tensors one call touches: x, y, W, and their gradients too."""
    return sum(shape.numel(batch)) * itemsize * (1 if mode == "fwd" else 2)


def network_bytes(name: str, order: str, norm: str, provider: str, batch: int = BATCH,
                  itemsize: int = 4) -> Tuple[int, int]:
    """(bytes moved, working set) of a training step: every unit's forward and backward as
    in unit_bytes, plus momentum SGD (read p, g, buffer; write p, buffer) over the conv
    weights. Pools, the residual additions and the classifier are left out."""
    moved = ws = 0
    for s in network_shapes(name):
        moved += s.count * unit_bytes(s, order, norm, provider, "fwdbwd", batch, itemsize)
        ws += s.count * unit_working_set(s, "fwdbwd", batch, itemsize)
        moved += s.count * 5 * s.numel(batch)[2] * itemsize
    return moved, ws


# ---------------------------------------------------------------------------- memory

def saved_bytes(fn: Callable[[], object], exclude=()) -> Tuple[int, List[tuple]]:
    """Bytes of the unique storages autograd saves for backward while `fn` runs (a forward),
    leaving out the storages of `exclude` (parameters, buffers); also the (shape, dtype,
    bytes) of each saved storage, to tell which tensors they are."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: Dict[int, tuple] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and ptr not in storages and t.untyped_storage().nbytes():
            storages[ptr] = (tuple(t.shape), str(t.dtype).replace("torch.", ""),
                             t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(v[2] for v in storages.values()), list(storages.values())


def activation_bytes(tensors: List[tuple]) -> int:
    """The bytes of saved_bytes' storages that are not per-channel vectors (1-D): the
    activation-sized tensors. The per-channel statistics differ in width by design (fused
    keeps the mean and variance in float64 for the centered norm, fused/_norm.py; eager
    saves float32 mean and inverse std), 8 bytes per normalized channel."""
    return sum(nbytes for shape, _, nbytes in tensors if len(shape) != 1)


class _LiveBytes(TorchDispatchMode):
    """Tracks the storages every op creates and their peak total while they are alive
    (checked at op boundaries; what an op allocates and frees inside itself is not seen)."""

    def __init__(self):
        super().__init__()
        self.live: Dict[int, Tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter):
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.live and storage.nbytes():
                    self.live[storage.data_ptr()] = (StorageWeakRef(storage),
                                                     storage.nbytes())
        self.peak = max(self.peak, sum(v[1] for v in self.live.values()))
        return out


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of the tensors `fn` creates that are alive at once (pre-existing
    parameters and inputs not counted)."""
    mode = _LiveBytes()
    with mode:
        fn()
    return mode.peak


# ---------------------------------------------------------------------------- selection

QUICK_SHAPE = UnitShape("resnet20", 64, 64, 3, 1, 1, 8)
QUICK_NETWORK_BATCH = 4


def unit_configs(quick: bool = False, wide: bool = False) -> List[tuple]:
    """(shape, order, norm, format) of the unit suites. Default: norm bn at the main shapes
    of every network (about 25 minutes in all with the networks on 2 cores), the other norms
    at ResNet-20's; `wide`: every norm at every main shape, NCHW and NHWC; `quick`: one."""
    if quick:
        return [(QUICK_SHAPE, "conv-bn-relu", "bn", "nchw")]
    configs = []
    for fmt in (("nchw", "nhwc") if wide else ("nchw",)):
        for net in NETWORKS:
            norms = fused.NORMS if wide or net == "resnet20" else ("bn",)
            for shape in main_shapes(net):
                for order in fused.ORDERS:
                    configs += [(shape, order, norm, fmt) for norm in norms if norm != "none"]
    return configs


# Networks also timed in channels_last by the full suite (NCHW is always timed).
CHANNELS_LAST_NETWORKS = ("resnet20",)


def network_configs(quick: bool = False, formats=("nchw", "nhwc")) -> List[tuple]:
    """(network, order, batch, memory format) of the network suites."""
    if quick:
        return [("resnet20", "conv-bn-relu", QUICK_NETWORK_BATCH, "nchw")]
    return [(net, order, BATCH, fmt) for net in NETWORKS for fmt in formats
            for order in fused.ORDERS
            if fmt == "nchw" or net in CHANNELS_LAST_NETWORKS]


def _memory(module: nn.Module, forward: Callable[[], object], step: Callable[[], object],
            peak: bool) -> Dict:
    exclude = [*module.parameters(), *module.buffers()]
    saved, tensors = saved_bytes(forward, exclude)
    out = dict(saved_bytes=saved, saved_tensors=tensors)
    if peak:
        step()   # lazily created state (optimizer buffers, workspaces) is not the step's peak
        out["peak_bytes"] = peak_bytes(step)
    return out


def unit_memory(shape: UnitShape, order: str, norm: str, provider: str, batch: int = BATCH,
                fmt_name: str = "nchw", peak: bool = True, device: str = "cpu") -> Dict:
    """Saved-for-backward bytes of the unit's training forward (parameters and buffers left
    out, the input counted) and peak live bytes of forward + backward."""
    fmt = FORMATS[fmt_name]
    module = build_unit(order, shape.cin, shape.cout, norm, provider, fmt, shape.kernel,
                        shape.stride, shape.padding, device)
    torch.manual_seed(1)
    x = torch.randn(batch, shape.cin, shape.size, shape.size, device=device)
    x = x.contiguous(memory_format=fmt).requires_grad_()
    return _memory(module, lambda: module(x), make_step(module, x, "fwdbwd"), peak)


def network_memory(name: str, order: str, norm: str, provider: str, batch: int = BATCH,
                   peak: bool = True, device: str = "cpu") -> Dict:
    """Saved bytes of the network's forward and loss, peak live bytes of a training step."""
    model = build_network(name, order, norm, provider, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x, target = network_batch(name, batch, device=device)

    def forward():
        return F.cross_entropy(model(x), target)

    def step():
        opt.zero_grad(set_to_none=True)
        forward().backward()
        opt.step()

    return _memory(model, forward, step, peak)
