"""bnorder.estimate: a run's estimate is the timed step and evaluation batch times the run's
step and batch counts, every configuration is timed once, and the study prints the total."""
import pytest
import torch

from bnorder import data as data_mod
from bnorder import estimate, study
from bnorder.train import TrainConfig


def test_run_seconds_counts_steps_evaluations_and_set_up():
    dataset = data_mod.load("synthetic")              # 1 024 training, 512 test images
    cfg = TrainConfig(model="cnn", epochs=3, batch_size=16, subset=100, test_subset=300,
                      gradflow_batch=32, data="synthetic")
    timing = {"step_s": 0.1, "eval_s": 0.2, "build_s": 0.5}
    # 100 // 16 = 6 steps and ceil(300 / 256) = 2 evaluation batches per epoch, the build,
    # and two gradient-flow probes of 32 images = 2 × 2 steps of 16
    assert estimate.run_seconds(cfg, timing, dataset) == pytest.approx(
        3 * (6 * 0.1 + 2 * 0.2) + 0.5 + 2 * 0.1 * 32 / 16)
    full = TrainConfig(model="cnn", epochs=1, batch_size=16, data="synthetic")
    assert estimate.run_seconds(full, timing, dataset) == pytest.approx(
        1024 // 16 * 0.1 + 2 * 0.2 + 0.5 + 2 * 0.1 * 32 / 16)


def test_estimate_times_each_configuration_once(capsys):
    spec = dict(study.PRESETS["quick"], models=["cnn"], orders=["conv-bn-relu"],
                norms=["bn", "none"], seeds=[0, 1, 2], data="synthetic", subset=64,
                test_subset=64, batch_size=16, epochs=2, widths={"cnn": 0.5})
    runs = study.grid(spec)
    assert len(runs) == 6
    dataset = data_mod.load("synthetic")
    est = estimate.estimate(runs, dataset, steps=2, progress=False)
    assert set(est["configs"]) == {("cnn", "conv-bn-relu", "fused"), ("cnn", "none", "fused")}
    for key, c in est["configs"].items():
        assert c["runs"] == 3 and c["step_s"] > 0 and c["eval_s"] > 0
        # every run of a configuration has the same estimate
        one = estimate.run_seconds(runs[0]["config"], c, dataset.subset(64, 64))
        assert c["seconds"] == pytest.approx(3 * one)
    assert est["total_s"] == pytest.approx(sum(c["seconds"] for c in est["configs"].values()))
    estimate.print_estimate(est, budget_s=1e-6, extra_s=30)
    out = capsys.readouterr().out
    assert "estimated duration" in out and "exceeds the time budget" in out
    assert "none" in out and "conv-bn-relu" in out


def test_wall_seconds_is_the_pool_taking_runs_in_order():
    assert estimate.wall_seconds([3, 1, 1, 1], 1) == 6
    # worker 1: 3; worker 2: 1, 1, 1 -> both free at 3
    assert estimate.wall_seconds([3, 1, 1, 1], 2) == 3
    # in order, not rearranged: the long run comes last and starts at 2
    assert estimate.wall_seconds([1, 1, 1, 1, 4], 2) == 6
    assert estimate.wall_seconds([], 4) == 0


def test_estimate_with_workers_times_at_a_workers_threads(monkeypatch, capsys):
    """--workers N: each configuration timed at cores/N threads, as each worker runs; the
    total is the pool's wall time, and the thread count is restored afterwards."""
    from bnorder import executors
    monkeypatch.setattr(executors, "cores", lambda: 4)
    seen = []
    real = estimate._time_config

    def timed(config, dataset, steps):
        seen.append(torch.get_num_threads())
        return real(config, dataset, steps)

    monkeypatch.setattr(estimate, "_time_config", timed)
    spec = dict(study.PRESETS["quick"], models=["cnn"], orders=["conv-bn-relu"],
                norms=["bn"], seeds=[0, 1, 2], data="synthetic", subset=64, test_subset=64,
                batch_size=16, epochs=1, widths={"cnn": 0.5})
    runs = study.grid(spec)
    before = torch.get_num_threads()
    est = estimate.estimate(runs, data_mod.load("synthetic"), steps=1, progress=False,
                            workers=2)
    assert seen == [2] and torch.get_num_threads() == before
    one = est["sum_s"] / 3
    assert est["total_s"] == pytest.approx(2 * one)      # three equal runs on two workers
    estimate.print_estimate(est)
    assert "on 2 workers at 2 threads each" in capsys.readouterr().out


def test_duration():
    assert [estimate.duration(s) for s in (12.4, 185, 7 * 3600 + 12 * 60 + 5)] == [
        "12 s", "3 min 05 s", "7 h 12 min"]
    assert estimate.duration(float("nan")) == "—"


def test_estimate_only_prints_and_trains_nothing(tmp_path, capsys):
    from bnorder import cli
    assert cli.main(["study", "--models", "cnn", "--orders", "conv-bn-relu", "--seeds", "0",
                     "--epochs", "1", "--subset", "32", "--test-subset", "32",
                     "--batch-size", "16", "--data", "synthetic", "--no-progress",
                     "--estimate-only", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "estimated duration" in out and "cnn" in out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "study.json").exists()
