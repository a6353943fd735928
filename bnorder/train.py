"""One training run: SGD on a network of `models`, evaluated every epoch, checkpointed every
epoch, resumable bit-for-bit on CPU.

Run folder:

    config.json      the run's configuration
    metrics.jsonl    one JSON object per epoch (WALL_CLOCK_FIELDS vary between machines
                     and runs; every other field is a deterministic function of the config)
    gradflow.json    per unit, ‖∂loss/∂conv.weight‖ on a fixed batch, at init and at the end
    checkpoints/     epoch-NNNN.pt, the last two kept; each written to a temporary file,
                     fsync'ed and renamed into place, so a kill leaves the previous one intact
    done.json        written last: the run is finished

A checkpoint holds the model, optimizer, scheduler, epoch, the metric rows so far and every
RNG state (torch's global generator, the data generator that draws the batch order and the
augmentation, python's `random`, numpy's). Resuming restores them and rewrites
metrics.jsonl from the checkpoint, so a run killed at any instant and resumed ends with the
same metrics as an uninterrupted one.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

import fused
import models

from . import data as data_mod
from . import distributed
from .common import (CheckpointError, TrainError, atomic_write_bytes,  # noqa: F401
                     atomic_write_json, read_jsonl, write_jsonl)

WALL_CLOCK_FIELDS = ("wall_s", "epoch_s", "train_s", "eval_s", "images_per_s", "step_s_median")
SCHEDULES = ("cosine", "step")
CKPT_FORMAT = 1
KEEP_CHECKPOINTS = 2


@dataclass
class TrainConfig:
    model: str = "resnet20"
    order: str = "conv-bn-relu"
    norm: str = "bn"
    fused: bool = False
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    seed: int = 0
    data: str = "fashion-mnist"
    data_dir: Optional[str] = None
    subset: Optional[int] = None         # train on the first N training images
    test_subset: Optional[int] = None    # evaluate on the first N test images
    compile: bool = False
    channels_last: bool = False
    gradflow_batch: int = 32
    augment: bool = True                 # the data set's random crop (and flip, where valid)
    model_options: Dict = field(default_factory=dict)

    @property
    def backend(self) -> str:
        return "fused" if self.fused else "eager"

    def validate(self) -> None:
        if self.model not in models.NAMES:
            raise TrainError(f"unknown model {self.model!r}; expected one of "
                             f"{', '.join(models.NAMES)}")
        if self.order not in fused.ORDERS:
            raise TrainError(f"unknown order {self.order!r}; expected one of "
                             f"{', '.join(fused.ORDERS)}")
        if self.norm not in fused.NORMS:
            raise TrainError(f"unknown norm {self.norm!r}; expected one of "
                             f"{', '.join(fused.NORMS)}")
        if self.schedule not in SCHEDULES:
            raise TrainError(f"unknown schedule {self.schedule!r}; expected one of "
                             f"{', '.join(SCHEDULES)}")
        if self.data not in data_mod.NAMES:
            raise TrainError(f"unknown data set {self.data!r}; expected one of "
                             f"{', '.join(data_mod.NAMES)}")
        for name in ("epochs", "batch_size", "gradflow_batch"):
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be at least 1, got "
                                 f"{getattr(self, name)}")
        for name in ("subset", "test_subset"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be positive, got {v}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainError(f"--lr must be a positive number, got {self.lr}")
        if self.momentum < 0 or self.weight_decay < 0:
            raise TrainError("--momentum and --weight-decay must be non-negative")
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise TrainError(f"--data-dir {self.data_dir}: no such directory")

    def to_json(self) -> Dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------- helpers

def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """cosine: ½(1 + cos(π·step/total)); step: ×0.1 at 50 % and 75 % of training (He et al.
    2015 divide at 32k and 48k of 64k iterations)."""
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    return 0.1 ** ((step >= total_steps // 2) + (step >= (3 * total_steps) // 4))


def rng_state(generator: torch.Generator) -> Dict:
    return {"torch": torch.get_rng_state(), "data": generator.get_state(),
            "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: Dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def checkpoint_paths(out: Path) -> List[Path]:
    return sorted((Path(out) / "checkpoints").glob("epoch-*.pt"))


def save_checkpoint(out: Path, state: Dict) -> Path:
    import io
    folder = Path(out) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    path = folder / f"epoch-{state['epoch']:04d}.pt"
    atomic_write_bytes(path, buf.getvalue())
    for old in checkpoint_paths(out)[:-KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> Dict:
    """A checkpoint, or CheckpointError naming the file (and the previous checkpoint, if any)."""
    path = Path(path)
    try:
        # Our own file: it holds numpy's and python's RNG states, not only tensors.
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
            raise ValueError("not a bnorder checkpoint")
        for key in ("model", "optimizer", "scheduler", "epoch", "rng", "history"):
            if key not in state:
                raise ValueError(f"missing {key!r}")
    except Exception as e:  # noqa: BLE001 — torch.load raises many types on a broken file
        others = [p for p in checkpoint_paths(path.parent.parent) if p != path]
        hint = (f"; the previous checkpoint {others[-1]} is intact: delete {path.name} to "
                f"resume from it" if others else "")
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt "
                              f"({type(e).__name__}: {e}){hint}") from None
    return state


def gradient_flow(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> List[Dict]:
    """Per unit, in network order, ‖∂loss/∂conv.weight‖ on the batch (x, y), computed on a
    copy in training mode, so neither the model's running statistics nor any RNG move."""
    probe = copy.deepcopy(model).train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        loss = F.cross_entropy(probe(x), y)
        probe.zero_grad(set_to_none=True)
        loss.backward()
    return [{"unit": name, "index": i, "grad_norm": float(unit.conv.weight.grad.norm())}
            for i, (name, unit) in enumerate(models.units_of(probe))]


def _finite(v: float) -> Optional[float]:
    return float(v) if math.isfinite(v) else None


def evaluate(model, data: data_mod.Dataset, batch_size: int, channels_last: bool):
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in data_mod.test_batches(data, batch_size, channels_last):
            out = model(x)
            total_loss += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            n += len(y)
    return total_loss / n, correct / n


# ---------------------------------------------------------------------------- the run

def prepare_data(config: TrainConfig, dataset: Optional[data_mod.Dataset] = None):
    dataset = dataset if dataset is not None else data_mod.load(config.data, config.data_dir)
    dataset = dataset.subset(config.subset, config.test_subset)
    # without augmentation a batch is its images as they are: no crop offset, no flip
    return dataset if config.augment else dataclasses.replace(dataset, crop_pad=0, flip=False)


def build_model(config: TrainConfig, dataset: data_mod.Dataset) -> torch.nn.Module:
    try:
        model = models.build(config.model, config.order, config.norm, config.backend,
                             in_channels=dataset.in_channels, num_classes=dataset.num_classes,
                             **config.model_options)
    except (TypeError, ValueError) as e:
        raise TrainError(str(e)) from None
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _check_resumable(out: Path, config: TrainConfig) -> None:
    saved = json.loads((out / "config.json").read_text())
    mine = config.to_json()
    diff = ", ".join(f"{k}: {saved.get(k)!r} there, {v!r} here" for k, v in mine.items()
                     if saved.get(k) != v)
    if diff:
        raise TrainError(f"{out} holds a run with another configuration ({diff}); "
                         "resume with the same arguments or choose another --out")


def train(config: TrainConfig, out: str | Path, resume: bool = False,
          dataset: Optional[data_mod.Dataset] = None, progress: bool = True,
          stop_after: Optional[int] = None, verbose: Optional[bool] = None,
          ddp: Optional[distributed.Context] = None,
          on_step: Optional[Callable[[int, int, int], None]] = None) -> List[Dict]:
    """Train (or resume) the run in folder `out`; returns the metric rows of every epoch.
    `stop_after` ends the process's work after that epoch (tests simulate a kill with it);
    `verbose` (default: `progress`) prints one line per epoch. `ddp`: this process's rank
    in a data-parallel run (bnorder.distributed); rank 0 alone writes `out`. `on_step(epoch,
    images trained in this epoch, images per epoch)` follows every step (a study's workers
    report their progress with it)."""
    ctx = ddp or distributed.LOCAL
    verbose = (progress if verbose is None else verbose) and ctx.is_main
    progress = progress and ctx.is_main
    config.validate()
    out = Path(out)
    ckpts = checkpoint_paths(out)
    if ckpts and not resume:
        raise TrainError(f"{out} already holds a run (checkpoints up to {ckpts[-1].name}); "
                         "pass --resume to continue it or choose another --out")
    if resume and (out / "config.json").exists():
        _check_resumable(out, config)
    ctx.record(out, resume)
    dataset = prepare_data(config, dataset)

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = build_model(config, dataset)
    params_decay = [p for p in model.parameters() if p.ndim > 1]
    params_other = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": params_decay, "weight_decay": config.weight_decay},
                                 {"params": params_other, "weight_decay": 0.0}],
                                lr=config.lr, momentum=config.momentum)
    steps = data_mod.steps_per_epoch(len(dataset.train_y), config.batch_size)
    total_steps = steps * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(config.schedule, s, total_steps))
    gx, gy = data_mod.fixed_batch(dataset, config.gradflow_batch, config.channels_last)

    history: List[Dict] = []
    gradflow: Dict = {}
    start = 0
    state = ctx.on_main(lambda: load_checkpoint(ckpts[-1]) if resume and ckpts else None)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], generator)
        history, gradflow, start = state["history"], state["gradflow"], state["epoch"]
    else:
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / "config.json", config.to_json())
        gradflow = {"init": gradient_flow(model, gx, gy)}
    if ctx.is_main:
        write_jsonl(out / "metrics.jsonl", history)

    train_model = ctx.wrap(model)  # DistributedDataParallel under --ddp
    step_model = torch.compile(train_model) if config.compile else train_model
    wall = history[-1]["wall_s"] if history else 0.0
    from tqdm import tqdm
    for epoch in range(start + 1, config.epochs + 1):
        t_epoch = time.perf_counter()
        model.train()
        total_loss, correct, seen, step_times = 0.0, 0, 0, []
        images = 0   # of the global batch, whatever this rank's share
        bar = tqdm(total=steps * config.batch_size, unit="img", unit_scale=True, leave=False,
                   disable=not progress, dynamic_ncols=True,
                   desc=f"{config.model} {config.order} {config.norm} {config.backend} "
                        f"s{config.seed} epoch {epoch}/{config.epochs}")
        for x, y in data_mod.train_batches(dataset, config.batch_size, generator,
                                           config.channels_last):
            batch = len(y)
            x, y = ctx.shard(x, y)  # this rank's slice of the global batch
            t_step = time.perf_counter()
            logits = step_model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            ctx.backward(loss, len(y), batch)
            optimizer.step()
            scheduler.step()
            step_times.append(time.perf_counter() - t_step)
            total_loss += float(loss.detach()) * len(y)
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += len(y)
            bar.update(batch)
            if on_step is not None:
                images += batch
                on_step(epoch, images, steps * config.batch_size)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
        bar.close()
        total_loss, correct, seen = ctx.sum(total_loss, correct, seen)
        train_s = time.perf_counter() - t_epoch
        t_eval = time.perf_counter()
        test_loss, test_acc = ctx.on_main(evaluate, model if ctx.active else step_model,
                                          dataset, max(config.batch_size, 256),
                                          config.channels_last)
        eval_s = time.perf_counter() - t_eval
        epoch_s = time.perf_counter() - t_epoch
        wall += epoch_s
        row = {"epoch": epoch, "step": epoch * steps, "lr": optimizer.param_groups[0]["lr"],
               "train_loss": _finite(total_loss / seen), "train_acc": correct / seen,
               "test_loss": _finite(test_loss), "test_acc": test_acc,
               "images_per_s": seen / train_s,
               "step_s_median": statistics.median(step_times),
               "train_s": train_s, "eval_s": eval_s, "epoch_s": epoch_s, "wall_s": wall}
        history.append(row)
        if epoch == config.epochs:
            gradflow["final"] = gradient_flow(model, gx, gy)
        if ctx.is_main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            save_checkpoint(out, {"format": CKPT_FORMAT, "epoch": epoch,
                                  "config": config.to_json(), "model": model.state_dict(),
                                  "optimizer": optimizer.state_dict(),
                                  "scheduler": scheduler.state_dict(),
                                  "rng": rng_state(generator), "history": history,
                                  "gradflow": gradflow})
        if verbose:
            print(f"epoch {epoch}/{config.epochs}  train_loss {row['train_loss']}  "
                  f"test_loss {row['test_loss']}  test_acc {test_acc:.4f}  "
                  f"{row['images_per_s']:.0f} img/s", flush=True)
        if stop_after is not None and epoch >= stop_after and epoch < config.epochs:
            return history

    if ctx.is_main:
        atomic_write_json(out / "gradflow.json", gradflow)
        atomic_write_json(out / "done.json", {"epochs": config.epochs, "final": history[-1]})
    return history


def is_done(out: Path, config: TrainConfig) -> bool:
    """The run in `out` finished with this configuration."""
    out = Path(out)
    try:
        saved = json.loads((out / "config.json").read_text())
        done = json.loads((out / "done.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return saved == config.to_json() and done.get("epochs") == config.epochs


def deterministic_fields(rows: List[Dict]) -> List[Dict]:
    """Metric rows without the wall-clock fields: what a resumed run reproduces exactly."""
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK_FIELDS} for r in rows]
