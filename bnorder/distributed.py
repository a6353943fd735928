"""Data-parallel training under torchrun: what `bnorder train --ddp [--sync-bn]` adds to a run.

    torchrun --nproc_per_node=K -m bnorder train --ddp --sync-bn ...

Every rank draws the same global batch of `--batch-size` images from the same seeded
generator (the data set is in memory on every rank) and keeps its own contiguous slice of
it: the ranks see disjoint shards of every epoch, and the run is the single-process run on
the same global batches, up to the order of floating-point sums. A batch that does not
divide by K is split unevenly (sizes differ by one); each rank's loss is weighted by its
share of the batch, so that DistributedDataParallel's gradient average equals the gradient
of the mean loss over the whole batch. With --sync-bn the batch statistics are those of the
global batch (fused.convert_sync_bn, nn.SyncBatchNorm semantics); without it each rank
normalizes with its own slice, as plain DDP does.

Rank 0 alone writes the run folder (config, metrics, checkpoints, progress) and evaluates;
on --resume it reads the checkpoint and sends it to the other ranks, so --out needs to be
visible to rank 0 only.
"""
from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

import fused

from .common import TrainError, atomic_write_json


@dataclass
class Context:
    """This process's place in the run; `Context()` is the single-process run."""
    rank: int = 0
    world_size: int = 1
    sync_bn: bool = False
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------------ model
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module that trains: DistributedDataParallel (after convert_sync_bn with
        --sync-bn) around `model`, or `model` itself. Evaluate and checkpoint `model`."""
        if not self.active:
            return model
        if self.sync_bn:
            fused.convert_sync_bn(model)
        model.to(self.device)
        devices = [self.device] if self.device.type == "cuda" else None
        # Synchronized running statistics are equal on every rank: no buffer broadcast.
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=devices, forward_sync_buffers=not self.sync_bn)

    # ------------------------------------------------------------------ data
    def bounds(self, n: int):
        """[start, stop) of this rank's slice of a global batch of n (sizes differ by one)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def shard(self, x: torch.Tensor, y: torch.Tensor):
        if not self.active:
            return x, y
        start, stop = self.bounds(len(y))
        return x[start:stop].to(self.device), y[start:stop].to(self.device)

    def backward(self, loss: torch.Tensor, local: int, total: int) -> None:
        """loss.backward() for this rank's mean loss, weighted by its share of the batch
        (DDP averages over ranks: Σ_r share_r·mean_r is the mean over the batch)."""
        if not self.active:
            loss.backward()
            return
        (loss * (self.world_size * local / total)).backward()

    # ------------------------------------------------------------------ reductions
    def sum(self, *values: float):
        """Each value summed over the ranks (floats)."""
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return tuple(t.tolist())

    def from_main(self, obj):
        """Rank 0's `obj` on every rank (pickled; for checkpoints and metric rows)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable, *args, **kwargs):
        """fn(...) computed on rank 0 and sent to every rank."""
        return self.from_main(fn(*args, **kwargs) if self.is_main else None)

    # ------------------------------------------------------------------ run folder
    def record(self, out: Path, resume: bool) -> None:
        """Rank 0 writes distributed.json (world size, --sync-bn) into a new run and checks
        it on --resume: a run continues with the layout it started with."""
        if not self.is_main:
            return
        path = Path(out) / "distributed.json"
        mine = {"world_size": self.world_size, "sync_bn": self.sync_bn}
        saved = json.loads(path.read_text()) if path.exists() else (
            {"world_size": 1, "sync_bn": False} if resume and (Path(out) / "config.json").exists()
            else None)
        if saved is not None and saved != mine:
            raise TrainError(f"{out} was started with {saved}, this launch is {mine}; "
                             f"resume with the same torchrun size and --sync-bn")
        if saved is None and self.active:
            Path(out).mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, mine)

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


LOCAL = Context()


def init(sync_bn: bool = False, device_type: str = "cpu",
         timeout_s: Optional[float] = None) -> Context:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT): nccl for a CUDA run (one GPU per local rank), gloo for a
    CPU run (the training loop trains on CPU today). Without torchrun's variables the
    run is a single process and nothing is communicated."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Context(sync_bn=sync_bn)
    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if world_size > 1 and not dist.is_initialized():
        kwargs = {} if timeout_s is None else {
            "timeout": datetime.timedelta(seconds=timeout_s)}
        dist.init_process_group(backend, rank=rank, world_size=world_size, **kwargs)
    return Context(rank=rank, world_size=world_size, sync_bn=sync_bn, device=device)

