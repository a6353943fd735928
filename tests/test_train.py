"""bnorder.train: bit-exact resume (simulated and with a real SIGKILL), atomic checkpoints,
and clear errors from the command line."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import models

from bnorder import cli, common, data, train

REPO = Path(__file__).resolve().parent.parent


def _config(**kw):
    base = dict(model="cnn", order="bn-conv-relu", norm="bn", fused=False, epochs=3,
                batch_size=16, lr=0.05, data="synthetic", subset=48, test_subset=32)
    base.update(kw)
    return train.TrainConfig(**base)


@pytest.fixture(scope="module")
def synthetic():
    return data.load("synthetic")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, synthetic):
    """An uninterrupted 3-epoch run: the metrics every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("ref")
    rows = train.train(_config(), out, dataset=synthetic, progress=False)
    return out, rows


def _final_state(out):
    return train.load_checkpoint(train.checkpoint_paths(out)[-1])


def test_run_folder_contents(reference_run):
    out, rows = reference_run
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    on_disk = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert on_disk == rows
    for key in ("epoch", "train_loss", "test_loss", "test_acc", "images_per_s", "wall_s"):
        assert all(key in r for r in rows)
    assert rows[-1]["test_acc"] > 0.3          # synthetic classes are easy: it learns
    assert json.loads((out / "config.json").read_text())["model"] == "cnn"
    flow = json.loads((out / "gradflow.json").read_text())
    units = [name for name, _ in models.units_of(models.build("cnn", in_channels=1))]
    assert [u["unit"] for u in flow["init"]] == [u["unit"] for u in flow["final"]] == units
    assert all(u["grad_norm"] > 0 for u in flow["init"] + flow["final"])
    # the last two checkpoints are kept
    assert [p.name for p in train.checkpoint_paths(out)] == ["epoch-0002.pt", "epoch-0003.pt"]
    assert (out / "done.json").exists()


@pytest.mark.parametrize("stop, fused", [(1, False), (2, True)])
def test_resume_reproduces_uninterrupted_run(tmp_path, tmp_path_factory, synthetic,
                                             reference_run, stop, fused):
    ref_out, ref_rows = reference_run
    if fused:   # the C++ kernels' reductions must be deterministic run to run as well
        ref_out = tmp_path_factory.mktemp("ref_fused")
        ref_rows = train.train(_config(fused=True), ref_out, dataset=synthetic,
                               progress=False)
    part = train.train(_config(fused=fused), tmp_path, dataset=synthetic, progress=False,
                       stop_after=stop)
    assert len(part) == stop and not (tmp_path / "done.json").exists()
    rows = train.train(_config(fused=fused), tmp_path, resume=True, dataset=synthetic,
                       progress=False)
    assert train.deterministic_fields(rows) == train.deterministic_fields(ref_rows)
    a, b = _final_state(ref_out), _final_state(tmp_path)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert (json.loads((tmp_path / "gradflow.json").read_text())
            == json.loads((ref_out / "gradflow.json").read_text()))


def test_sigkill_then_resume(tmp_path, reference_run):
    """A real `bnorder train` process killed with SIGKILL after its first checkpoint, then
    resumed, ends with exactly the metrics of the uninterrupted run."""
    _, ref_rows = reference_run
    out = tmp_path / "run"
    cfg = _config()
    args = [sys.executable, "-m", "bnorder", "train", "--model", cfg.model, "--order",
            cfg.order, "--epochs", "3", "--batch-size", "16", "--lr", "0.05",
            "--data", "synthetic", "--subset", "48", "--test-subset", "32", "--out", str(out),
            "--no-progress", "--weight-decay", str(cfg.weight_decay)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / "epoch-0001.pt").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_early = not (out / "done.json").exists()
    done = subprocess.run(args + ["--resume"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = train.read_jsonl(out / "metrics.jsonl")
    assert json.loads((out / "config.json").read_text()) == cfg.to_json()
    assert train.deterministic_fields(rows) == train.deterministic_fields(ref_rows)
    assert killed_early, "the process finished before it could be killed: test is vacuous"


def test_truncated_checkpoint_gives_clear_error_and_keeps_previous(tmp_path, synthetic,
                                                                    reference_run):
    _, ref_rows = reference_run
    train.train(_config(), tmp_path, dataset=synthetic, progress=False, stop_after=2)
    last = tmp_path / "checkpoints" / "epoch-0002.pt"
    blob = last.read_bytes()
    last.write_bytes(blob[:len(blob) // 2])
    with pytest.raises(train.CheckpointError) as e:
        train.train(_config(), tmp_path, resume=True, dataset=synthetic, progress=False)
    assert "epoch-0002.pt is truncated or corrupt" in str(e.value)
    assert "epoch-0001.pt is intact" in str(e.value)
    assert train.load_checkpoint(tmp_path / "checkpoints" / "epoch-0001.pt")["epoch"] == 1
    last.unlink()               # as the message says: resume from the previous one
    rows = train.train(_config(), tmp_path, resume=True, dataset=synthetic, progress=False)
    assert train.deterministic_fields(rows) == train.deterministic_fields(ref_rows)


def test_failed_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    state = {"format": train.CKPT_FORMAT, "epoch": 1, "model": {}, "optimizer": {},
             "scheduler": {}, "rng": {}, "history": [], "gradflow": {}}
    first = train.save_checkpoint(tmp_path, state)

    def crash(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(common.os, "replace", crash)
    with pytest.raises(OSError):
        train.save_checkpoint(tmp_path, dict(state, epoch=2))
    monkeypatch.undo()
    assert train.checkpoint_paths(tmp_path) == [first]
    assert train.load_checkpoint(first)["epoch"] == 1


def test_resume_with_other_config_is_refused(tmp_path, synthetic):
    train.train(_config(epochs=1), tmp_path, dataset=synthetic, progress=False)
    with pytest.raises(train.TrainError, match="another configuration.*lr"):
        train.train(_config(epochs=1, lr=0.5), tmp_path, resume=True, dataset=synthetic,
                    progress=False)
    with pytest.raises(train.TrainError, match="--resume"):
        train.train(_config(epochs=1), tmp_path, dataset=synthetic, progress=False)


def test_schedules():
    assert train.lr_factor("cosine", 0, 100) == 1.0
    assert train.lr_factor("cosine", 50, 100) == pytest.approx(0.5)
    assert train.lr_factor("cosine", 100, 100) == pytest.approx(0.0)
    assert [train.lr_factor("step", s, 100) for s in (0, 49, 50, 74, 75, 99)] == \
        pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


@pytest.mark.parametrize("argv, message", [
    (["--model", "nope"], "invalid choice: 'nope'"),
    (["--order", "relu-conv-bn"], "invalid choice: 'relu-conv-bn'"),
    (["--norm", "ln"], "invalid choice: 'ln'"),
    (["--epochs", "-1"], "must be at least 1"),
    (["--lr", "abc"], "not a number"),
])
def test_cli_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_missing_data(capsys, tmp_path):
    assert cli.main(["train", "--data", "cifar10", "--data-dir", str(tmp_path / "no"),
                     "--out", str(tmp_path / "o")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert cli.main(["train", "--data", "cifar10", "--data-dir", str(tmp_path),
                     "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "data_batch_1" in err and "test_batch" in err and "never downloaded" in err


def test_without_augmentation_batches_are_the_images(synthetic):
    """augment=False trains on the images as they are: each batch is its images, normalized,
    in the epoch's random order; with augmentation the same images come shifted."""
    plain = train.prepare_data(_config(augment=False), synthetic)
    assert plain.crop_pad == 0 and not plain.flip
    assert train.prepare_data(_config(), synthetic).crop_pad > 0     # the default augments
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(48, generator=torch.Generator().manual_seed(0))
    x, y = next(data.train_batches(plain, 16, g))
    assert torch.equal(y, plain.train_y[order[:16]])
    assert torch.equal(x, data.normalize(plain.train_x[order[:16]], plain))
    shifted = train.prepare_data(_config(), synthetic)
    xa, _ = next(data.train_batches(shifted, 16, torch.Generator().manual_seed(0)))
    assert not torch.equal(xa, x)
