"""Data sets held in memory as uint8 tensors, and vectorized, seeded augmentation.

    fashion-mnist  Debian's dataset-fashion-mnist (gzipped IDX files), 28×28 padded to 32×32
    cifar10        a user-given folder in the standard python-pickle layout, never downloaded
    synthetic      class-dependent random images, for smoke tests

torchvision is not used (DESIGN §8): the IDX/pickle readers and the two augmentations
(random crop with zero padding, horizontal flip) are written here on plain tensors, so a
whole batch is augmented with a few gather calls driven by one torch.Generator.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

NAMES = ("fashion-mnist", "cifar10", "synthetic")

FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
REPO_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "debian"
FMNIST_FILES = {"train_images": "train-images-idx3-ubyte.gz",
                "train_labels": "train-labels-idx1-ubyte.gz",
                "test_images": "t10k-images-idx3-ubyte.gz",
                "test_labels": "t10k-labels-idx1-ubyte.gz"}
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"
INSTALL_HINT = ("install it with `make setup` (bnorder/install_data.sh), i.e. as root "
                "`apt-get update && apt-get install -y dataset-fashion-mnist`, or as a user "
                "`apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb "
                f"{REPO_CACHE}`, or pass --data-dir DIR holding the four *-ubyte.gz files")


class DataError(RuntimeError):
    """A data set is missing, truncated or malformed; the message says which file and why."""


@dataclass
class Dataset:
    name: str
    train_x: Tensor          # uint8 N×C×32×32
    train_y: Tensor          # int64 N
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    mean: tuple              # per-channel, in [0, 1] units, from the training images
    std: tuple
    flip: bool               # horizontal flip is a valid augmentation for this data
    crop_pad: int = 4

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    def subset(self, n_train: Optional[int] = None, n_test: Optional[int] = None) -> "Dataset":
        """The first n images of each split (the normalization statistics are kept)."""
        def cut(x, n):
            if n is None:
                return x
            if n <= 0:
                raise DataError(f"subset size must be positive, got {n}")
            return x[:n]
        return Dataset(self.name, cut(self.train_x, n_train), cut(self.train_y, n_train),
                       cut(self.test_x, n_test), cut(self.test_y, n_test), self.num_classes,
                       self.mean, self.std, self.flip, self.crop_pad)


# ---------------------------------------------------------------------------- IDX files

_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: Path) -> np.ndarray:
    """One gzipped IDX file (the MNIST format): magic 0x0000 TT DD, DD big-endian int32
    dimensions, then the data. Only unsigned bytes (TT = 0x08) occur in Fashion-MNIST."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip file ({e})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes, no header)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code not in _IDX_DTYPES or not 1 <= ndim <= 4:
        raise DataError(f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x0000080N "
                        "for unsigned-byte data)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX header promises {expected} bytes for shape {dims}, the "
                        f"file holds {len(raw) - header} (truncated or corrupt)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def fashion_mnist_dir(data_dir: Optional[str] = None) -> Path:
    """Where the four IDX files are: --data-dir, else the system package, else the repo cache."""
    candidates = ([Path(data_dir)] if data_dir else
                  [FMNIST_SYSTEM_DIR, REPO_CACHE / FMNIST_SYSTEM_DIR.relative_to("/")])
    for d in candidates:
        if all((d / f).is_file() for f in FMNIST_FILES.values()):
            return d
    looked = ", ".join(str(d) for d in candidates)
    raise DataError(f"Fashion-MNIST not found (looked in {looked} for "
                    f"{', '.join(FMNIST_FILES.values())}); {INSTALL_HINT}")


def pad_to_32(x: np.ndarray) -> np.ndarray:
    """N×H×W (H, W ≤ 32) → N×1×32×32 with zeros around, centred."""
    n, h, w = x.shape
    top, left = (32 - h) // 2, (32 - w) // 2
    out = np.zeros((n, 1, 32, 32), dtype=np.uint8)
    out[:, 0, top:top + h, left:left + w] = x
    return out


def load_fashion_mnist(data_dir: Optional[str] = None) -> Dataset:
    d = fashion_mnist_dir(data_dir)
    parts = {k: read_idx(d / f) for k, f in FMNIST_FILES.items()}
    for split in ("train", "test"):
        images, labels = parts[f"{split}_images"], parts[f"{split}_labels"]
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataError(f"{d / FMNIST_FILES[split + '_images']}: expected N×28×28 images, "
                            f"got shape {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(f"{d}: {split} has {len(images)} images but labels of shape "
                            f"{labels.shape}")
        if labels.max(initial=0) > 9:
            raise DataError(f"{d / FMNIST_FILES[split + '_labels']}: label {labels.max()} > 9")
    return _make("fashion-mnist", pad_to_32(parts["train_images"]), parts["train_labels"],
                 pad_to_32(parts["test_images"]), parts["test_labels"], 10, flip=False)


# ---------------------------------------------------------------------------- CIFAR-10

def cifar10_dir(data_dir: Optional[str]) -> Path:
    if not data_dir:
        raise DataError("--data cifar10 needs --data-dir DIR: the folder of the python version "
                        f"of CIFAR-10 (cifar-10-batches-py) holding {', '.join(CIFAR_TRAIN)} "
                        f"and {CIFAR_TEST}; it is never downloaded")
    base = Path(data_dir)
    for d in (base, base / "cifar-10-batches-py"):
        if all((d / f).is_file() for f in (*CIFAR_TRAIN, CIFAR_TEST)):
            return d
    missing = [f for f in (*CIFAR_TRAIN, CIFAR_TEST) if not (base / f).is_file()]
    raise DataError(f"CIFAR-10 not found in {base}: missing {', '.join(missing)} (expected the "
                    "python-pickle layout data_batch_1..data_batch_5 and test_batch, as in "
                    "cifar-10-python.tar.gz); it is never downloaded")


def read_cifar_batch(path: Path) -> tuple:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise DataError(f"{path}: corrupt or truncated CIFAR-10 batch ({e})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path}: not a CIFAR-10 batch (a {type(batch).__name__}, not a dict)")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path}: CIFAR-10 batch without 'data' and 'labels' keys")
    data = np.asarray(data, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{path}: expected N×3072 data and N labels, got {data.shape} and "
                        f"{labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir: Optional[str]) -> Dataset:
    d = cifar10_dir(data_dir)
    train = [read_cifar_batch(d / f) for f in CIFAR_TRAIN]
    tx, ty = read_cifar_batch(d / CIFAR_TEST)
    return _make("cifar10", np.concatenate([b[0] for b in train]),
                 np.concatenate([b[1] for b in train]), tx, ty, 10, flip=True)


# ---------------------------------------------------------------------------- synthetic

def load_synthetic(n_train: int = 1024, n_test: int = 512, channels: int = 1,
                   num_classes: int = 10, seed: int = 0) -> Dataset:
    """Learnable random data: each class is a fixed smooth random template (4×4 upsampled,
    so that a random crop's shift keeps it recognizable) plus pixel noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=g) * 220
    templates = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear",
                                                align_corners=False)

    def draw(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = templates[y] + torch.randn(n, channels, 32, 32, generator=g) * 40
        return x.clamp(0, 255).to(torch.uint8).numpy(), y.numpy()
    (trx, try_), (tex, tey) = draw(n_train), draw(n_test)
    return _make("synthetic", trx, try_, tex, tey, num_classes, flip=False)


def _make(name, train_x, train_y, test_x, test_y, num_classes, flip) -> Dataset:
    tx = torch.from_numpy(np.ascontiguousarray(train_x))
    scaled = tx.to(torch.float64) / 255
    mean = tuple(scaled.mean(dim=(0, 2, 3)).tolist())
    std = tuple(scaled.std(dim=(0, 2, 3)).tolist())
    return Dataset(name, tx, torch.from_numpy(np.asarray(train_y, dtype=np.int64)),
                   torch.from_numpy(np.ascontiguousarray(test_x)),
                   torch.from_numpy(np.asarray(test_y, dtype=np.int64)), num_classes,
                   mean, std, flip)


def load(name: str, data_dir: Optional[str] = None) -> Dataset:
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    if name == "cifar10":
        return load_cifar10(data_dir)
    if name == "synthetic":
        return load_synthetic()
    raise DataError(f"unknown data set {name!r}; expected one of {NAMES}")


# ---------------------------------------------------------------------------- augmentation

def random_crop(x: Tensor, pad: int, generator: torch.Generator) -> Tensor:
    """Zero-pad by `pad` on each side and crop back at a random offset, per image."""
    if pad == 0:
        return x
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
    return out.gather(3, cols)


def random_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Mirror each image left-right with probability 1/2."""
    mask = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def augment(x: Tensor, data: Dataset, generator: torch.Generator) -> Tensor:
    x = random_crop(x, data.crop_pad, generator)
    return random_flip(x, generator) if data.flip else x


def normalize(x: Tensor, data: Dataset, channels_last: bool = False) -> Tensor:
    """uint8 → float32, standardized per channel with the training set's statistics."""
    mean = torch.tensor(data.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(data.std, dtype=torch.float32).view(1, -1, 1, 1)
    out = (x.to(torch.float32) / 255 - mean) / std
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches only (a last batch of one image breaks batch norm); at least one."""
    return max(1, n // batch_size)


def train_batches(data: Dataset, batch_size: int, generator: torch.Generator,
                  channels_last: bool = False) -> Iterator[tuple]:
    """One epoch: a random order, then augmented, normalized batches, all from `generator`."""
    n = len(data.train_y)
    order = torch.randperm(n, generator=generator)
    for i in range(steps_per_epoch(n, batch_size)):
        idx = order[i * batch_size:(i + 1) * batch_size]
        x = augment(data.train_x[idx], data, generator)
        yield normalize(x, data, channels_last), data.train_y[idx]


def test_batches(data: Dataset, batch_size: int, channels_last: bool = False) -> Iterator[tuple]:
    for i in range(0, len(data.test_y), batch_size):
        yield (normalize(data.test_x[i:i + batch_size], data, channels_last),
               data.test_y[i:i + batch_size])


def fixed_batch(data: Dataset, size: int = 128, channels_last: bool = False) -> tuple:
    """The first `size` training images, unaugmented: the batch of the gradient-flow profile."""
    return (normalize(data.train_x[:size], data, channels_last), data.train_y[:size])


def class_counts(labels: Tensor, num_classes: int = 10) -> Sequence[int]:
    return torch.bincount(labels, minlength=num_classes).tolist()
