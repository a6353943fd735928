"""bnorder.data: the IDX and CIFAR readers, their errors, and the seeded augmentation."""
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from bnorder import data


def _write_idx(path, array, magic_type=0x08, truncate=0):
    header = struct.pack(">HBB", 0, magic_type, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(payload[:len(payload) - truncate])


def _fake_fmnist(folder, n_train=20, n_test=10):
    rng = np.random.default_rng(0)
    _write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28)))
    _write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(n_train) % 10)
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n_test, 28, 28)))
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(n_test) % 10)


def _real_fmnist_dir():
    try:
        return data.fashion_mnist_dir()
    except data.DataError:
        return None


@pytest.mark.skipif(_real_fmnist_dir() is None,
                    reason="Fashion-MNIST not installed (make setup / bnorder/install_data.sh)")
def test_real_fashion_mnist_sizes_and_classes():
    d = data.load("fashion-mnist")
    assert d.train_x.shape == (60000, 1, 32, 32) and d.train_x.dtype == torch.uint8
    assert d.test_x.shape == (10000, 1, 32, 32)
    assert data.class_counts(d.train_y) == [6000] * 10
    assert data.class_counts(d.test_y) == [1000] * 10
    # padding 28 → 32 leaves a 2-pixel zero border
    assert int(d.train_x[:, :, :2].max()) == 0 and int(d.train_x[:, :, :, -2:].max()) == 0
    assert int(d.train_x[:, :, 2:30, 2:30].max()) == 255
    assert 0.1 < d.mean[0] < 0.4 and 0.2 < d.std[0] < 0.5


def test_fake_fashion_mnist_roundtrip(tmp_path):
    _fake_fmnist(tmp_path)
    d = data.load("fashion-mnist", str(tmp_path))
    assert d.train_x.shape == (20, 1, 32, 32) and d.test_x.shape == (10, 1, 32, 32)
    raw = data.read_idx(tmp_path / "train-images-idx3-ubyte.gz")
    assert torch.equal(d.train_x[:, 0, 2:30, 2:30], torch.from_numpy(raw.copy()))
    assert d.train_y.tolist() == [i % 10 for i in range(20)]
    assert d.flip is False


def test_idx_truncated_payload(tmp_path):
    _fake_fmnist(tmp_path)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz",
               np.zeros((20, 28, 28)), truncate=100)
    with pytest.raises(data.DataError, match="truncated or corrupt"):
        data.load("fashion-mnist", str(tmp_path))


def test_idx_truncated_gzip_stream(tmp_path):
    path = tmp_path / "x.gz"
    _write_idx(path, np.zeros((50, 28, 28)))
    blob = path.read_bytes()
    path.write_bytes(blob[:len(blob) // 2])
    with pytest.raises(data.DataError, match="corrupt or truncated gzip"):
        data.read_idx(path)


def test_idx_bad_magic(tmp_path):
    path = tmp_path / "x.gz"
    _write_idx(path, np.zeros((3, 4)), magic_type=0x0D)   # float data: not ours
    with pytest.raises(data.DataError, match="bad IDX magic"):
        data.read_idx(path)
    with gzip.open(path, "wb") as f:
        f.write(b"PK\x03\x04 not an idx file")
    with pytest.raises(data.DataError, match="bad IDX magic"):
        data.read_idx(path)


def test_idx_not_gzip(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(b"plain bytes, not gzip")
    with pytest.raises(data.DataError, match=str(path)):
        data.read_idx(path)


def test_fashion_mnist_missing_names_both_routes(tmp_path):
    with pytest.raises(data.DataError) as e:
        data.load("fashion-mnist", str(tmp_path))
    msg = str(e.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg
    assert "apt-get download dataset-fashion-mnist" in msg and "dpkg -x" in msg


def _fake_cifar(folder, n=8):
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)],
                 b"batch_label": name.encode()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar_fake_batches(tmp_path):
    _fake_cifar(tmp_path)
    d = data.load("cifar10", str(tmp_path))
    assert d.train_x.shape == (40, 3, 32, 32) and d.test_x.shape == (8, 3, 32, 32)
    assert d.flip is True and len(d.mean) == 3
    with open(tmp_path / "data_batch_2", "rb") as f:
        b2 = pickle.load(f)
    # row-major 3072 = 3 planes of 32×32, red first
    assert torch.equal(d.train_x[8], torch.from_numpy(b2[b"data"][0].reshape(3, 32, 32)))
    assert d.train_y[8:16].tolist() == b2[b"labels"]
    # the conventional sub-folder is found too
    (tmp_path / "cifar-10-batches-py").mkdir()
    _fake_cifar(tmp_path / "cifar-10-batches-py", n=4)
    assert len(data.cifar10_dir(str(tmp_path)).name) > 0


def test_cifar_missing_and_corrupt(tmp_path):
    with pytest.raises(data.DataError, match="data_batch_1.*test_batch"):
        data.load("cifar10", str(tmp_path))
    with pytest.raises(data.DataError, match="--data-dir"):
        data.load("cifar10", None)
    _fake_cifar(tmp_path)
    blob = (tmp_path / "data_batch_3").read_bytes()
    (tmp_path / "data_batch_3").write_bytes(blob[:len(blob) // 3])
    with pytest.raises(data.DataError, match="data_batch_3.*corrupt or truncated"):
        data.load("cifar10", str(tmp_path))


def test_augmentation_is_seeded_and_vectorized():
    d = data.load_synthetic(64, 8, channels=3)
    d.flip = True
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = [x for x, _ in data.train_batches(d, 16, g1)]
    b = [x for x, _ in data.train_batches(d, 16, g2)]
    assert len(a) == 4 and all(torch.equal(x, y) for x, y in zip(a, b))
    c = [x for x, _ in data.train_batches(d, 16, torch.Generator().manual_seed(6))]
    assert not torch.equal(a[0], c[0])


def test_random_crop_matches_per_image_crop():
    x = torch.randint(0, 256, (10, 2, 8, 8), dtype=torch.uint8)
    g = torch.Generator().manual_seed(3)
    out = data.random_crop(x, 2, g)
    g = torch.Generator().manual_seed(3)
    oy = torch.randint(0, 5, (10,), generator=g)
    ox = torch.randint(0, 5, (10,), generator=g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(10):
        want = padded[i, :, oy[i]:oy[i] + 8, ox[i]:ox[i] + 8]
        assert torch.equal(out[i], want)
    assert out.dtype == torch.uint8


def test_random_flip_mirrors_about_half():
    x = torch.arange(4 * 4).view(1, 1, 4, 4).repeat(400, 1, 1, 1).to(torch.uint8)
    out = data.random_flip(x, torch.Generator().manual_seed(0))
    flipped = (out != x).flatten(1).any(1)
    assert torch.equal(out[flipped], x[flipped].flip(3))
    assert 150 < int(flipped.sum()) < 250


def test_fashion_mnist_is_not_flipped():
    d = data.load_synthetic(32, 8)
    assert d.flip is False
    g = torch.Generator().manual_seed(0)
    # with no crop padding and no flip, augmentation is the identity
    d.crop_pad = 0
    assert torch.equal(data.augment(d.train_x, d, g), d.train_x)


def test_subset_and_steps():
    d = data.load_synthetic(100, 50)
    s = d.subset(30, 20)
    assert len(s.train_y) == 30 and len(s.test_y) == 20 and s.mean == d.mean
    assert data.steps_per_epoch(30, 16) == 1 and data.steps_per_epoch(10, 16) == 1
    assert data.steps_per_epoch(64, 16) == 4
