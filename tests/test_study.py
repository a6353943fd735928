"""bnorder.study / bnorder.report: a tiny study end to end (grid, skip of finished runs, report
files with every section and figure, the numbers in them computed from the runs)."""
import argparse
import html as html_mod
import json
import statistics

import pytest

from bnorder import cli, report, study, train

TINY = ["--models", "cnn", "--orders", "conv-bn-relu", "--seeds", "0,1", "--epochs", "2",
        "--backends", "eager,fused",
        "--subset", "32",
        "--test-subset", "32", "--batch-size", "16", "--data", "synthetic", "--no-progress",
        "--lr", "0.05"]
SECTIONS = ["# bnorder study: quick", "## What the data can and cannot conclude",
            "### Published figures", "## Convergence", "## Final accuracy",
            "### All pairs (Welch's t-test on final accuracy)", "## Time to accuracy",
            "## Throughput and BN tax", "## Gradient flow"]
FIGURES = ["curves_epoch.png", "curves_wall.png", "final_accuracy.png",
           "time_to_accuracy.png", "throughput.png", "bn_tax.png", "gradient_flow.png"]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    assert cli.main(["study", *TINY, "--out", str(out)]) == 0
    return out


def _resolve(preset, **overrides):
    args = argparse.Namespace(preset=preset, **{k: None for k in (
        "models", "orders", "norms", "seeds", "backends", "epochs", "subset", "test_subset",
        "batch_size", "data", "data_dir", "lr", "budget_s")})
    for k, v in overrides.items():
        setattr(args, k, v)
    return study.resolve(args)


def test_grid_of_the_quick_preset():
    spec = _resolve("quick")
    runs = study.grid(spec)
    # 3 networks × (3 orders with bn + none) × fused seeds 0, 1; no eager training run
    assert len(runs) == 3 * 4 * 2
    assert {r["backend"] for r in runs} == {"fused"}
    assert {r["label"] for r in runs} == {"conv-bn-relu", "conv-relu-bn", "bn-conv-relu",
                                          "none"}
    # eager stays in the study as a measured backend (step times, BN tax, agreement)
    assert "eager" in spec["backends"] and spec["bench_rounds"] >= 2
    # tiers: seed 0 for every network, then seed 1
    assert [r["seed"] for r in runs] == [0] * 12 + [1] * 12
    assert [r["model"] for r in runs][:12] == ["alexnet"] * 4 + ["vgg16"] * 4 + ["resnet20"] * 4
    # every run trains at its network's width, channels_last, on ≥ 2 000 test images
    for r in runs:
        cfg = r["config"]
        assert cfg.model_options == {"width": spec["widths"][r["model"]]}
        assert cfg.channels_last and cfg.test_subset >= 2000 and cfg.data == "fashion-mnist"
        assert cfg.lr == spec["lr"] == 0.05 and not cfg.augment
    # a per-network learning rate (`lrs`) overrides the preset's for that network only
    per_network = study.grid(dict(spec, lrs={"resnet20": 0.1}))
    assert {(r["model"], r["config"].lr) for r in per_network} == {
        ("alexnet", 0.05), ("vgg16", 0.05), ("resnet20", 0.1)}
    # --lr sets every network's learning rate
    assert {r["config"].lr for r in study.grid(_resolve("quick", lr=0.02))} == {0.02}
    # --seeds sets the trained backends' seeds; the measured-only one stays untrained
    more = study.grid(_resolve("quick", seeds=[0, 1, 2]))
    assert {r["backend"] for r in more} == {"fused"} and len(more) == 3 * 4 * 3
    # backends named on the command line all train
    both = study.grid(_resolve("quick", seeds=[0], backends=["eager", "fused"]))
    assert sorted({r["backend"] for r in both}) == ["eager", "fused"] and len(both) == 24


def test_cpu_preset_settles_something():
    spec = _resolve("cpu")
    runs = study.grid(spec)
    assert spec["data"] == "fashion-mnist" and spec["subset"] is None
    assert spec["test_subset"] is None and len(spec["seeds"]) >= 3
    assert set(spec["widths"]) == set(spec["models"]) == {"alexnet", "vgg16", "resnet20"}
    assert {r["backend"] for r in runs} == {"fused"} and "eager" in spec["backends"]
    assert len(runs) == 3 * 4 * len(spec["seeds"])
    assert "budget_s" not in spec


def test_paper_preset_keeps_its_recipe():
    args = dict(data_dir="/")
    spec = _resolve("paper", **args)
    cfg = study.grid(spec)[0]["config"]
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.schedule) == \
        (164, 128, 0.1, 1e-4, "step")
    assert cfg.model_options == {"width": 1.0}


def test_report_files_and_sections(tiny_study):
    md = (tiny_study / "report.md").read_text()
    html = (tiny_study / "report.html").read_text()
    for section in SECTIONS:
        assert section in md
        assert html_mod.escape(section.lstrip("# ")) in html
    for fig in FIGURES:
        png = tiny_study / "figures" / fig
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(figures/{fig})" in md and f"src='figures/{fig}'" in html
    assert "8 of 8 runs finished" in md


def _runs(out):
    spec = json.loads((out / "study.json").read_text())
    return spec, report._load_runs(study.grid(spec), study.run_dir, out)


def test_report_numbers_come_from_the_runs(tiny_study):
    spec, runs = _runs(tiny_study)
    bench = json.loads((tiny_study / "throughput.json").read_text())["results"]
    res = report.analyse(spec, runs, bench)
    md = (tiny_study / "report.md").read_text()
    for r in res["rows"]:
        finals = [g["rows"][-1]["test_acc"] for g in runs
                  if (g["label"], g["backend"]) == (r["label"], "fused")]
        assert r["acc_mean"] == pytest.approx(statistics.fmean(finals))
        assert report._pm(r["acc_mean"], r["acc_std"]) in md

    def step(label, backend):
        return statistics.median(row["step_s_median"] for g in runs
                                 if (g["label"], g["backend"]) == (label, backend)
                                 for row in g["rows"])
    cbr = next(r for r in res["rows"] if r["label"] == "conv-bn-relu")
    for backend in ("eager", "fused"):
        # throughput and BN tax from the interleaved measurement ...
        b, none = bench[f"cnn|conv-bn-relu|{backend}"], bench[f"cnn|none|{backend}"]
        assert b["rounds"] >= 2 and b["batch_size"] == spec["bench_batch"]
        assert cbr[f"tax_{backend}"] == pytest.approx(b["step_s"] / none["step_s"] - 1)
        assert cbr[f"img_s_{backend}"] == pytest.approx(spec["bench_batch"] / b["step_s"])
        assert _fmt_tax(cbr[f"tax_{backend}"]) in md
        # ... and each run's own throughput from its metrics
        assert cbr[f"run_img_s_{backend}"] == pytest.approx(16 / step("conv-bn-relu", backend))
    # eager vs fused: the losses of the interleaved steps (same start, same batch) ...
    for r in res["rows"]:
        eager, fusd = (bench[f"cnn|{r['label']}|{b}"] for b in ("eager", "fused"))
        assert len(eager["losses"]) == eager["rounds"] + 1       # the warm-up step too
        assert r["agreement"] == max(abs(a - b) / abs(b) for a, b in
                                     zip(eager["losses"], fusd["losses"]))
        assert r["agreement"] < 1e-3 and f"{r['agreement']:.1e}" in md
    # ... and the largest final-accuracy difference over the seeds both ran
    for r in res["rows"]:
        final = {(g["backend"], g["seed"]): g["rows"][-1]["test_acc"] for g in runs
                 if g["label"] == r["label"]}
        assert r["eager_fused_diff"] == max(abs(final["eager", s] - final["fused", s])
                                            for s in (0, 1))


def _fmt_tax(v):
    return report._fmt(v, percent=True)


def test_rerun_skips_finished_runs(tiny_study, capsys):
    before = {p: p.stat().st_mtime_ns for p in tiny_study.glob("runs/**/done.json")}
    assert cli.main(["study", *TINY, "--out", str(tiny_study)]) == 0
    out = capsys.readouterr().out
    assert "8 runs" in out and "(8 already finished)" in out and "report:" in out
    assert before == {p: p.stat().st_mtime_ns for p in tiny_study.glob("runs/**/done.json")}


def test_welch_test_says_when_seeds_are_too_few():
    assert "too few seeds" in report.welch([0.5], [0.6, 0.7])["note"]
    res = report.welch([0.50, 0.52, 0.51], [0.70, 0.71, 0.69])
    assert res["p"] < 0.01 and "low power" in res["note"]
    assert report.welch([0.5, 0.5], [0.5, 0.5])["p"] is None


def test_time_budget_stops_before_new_runs(tmp_path, capsys):
    assert cli.main(["study", *TINY, "--models", "cnn", "--seeds", "0", "--backends", "eager",
                     "--budget-s", "1e-9", "--bench-rounds", "0", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    spec = json.loads((tmp_path / "study.json").read_text())
    # the first run always starts; every later one is listed as not started
    assert "time budget" in out and len(spec["not_started"]) == 1
    # the estimate came first and warned that the runs exceed the budget
    assert out.index("estimated duration") < out.index("time budget of")
    assert "exceeds the time budget" in out
    assert "the time budget stopped the study" in (tmp_path / "report.md").read_text()


def test_study_errors(tmp_path, capsys):
    assert cli.main(["study", "--data", "cifar10", "--out", str(tmp_path)]) == 2
    assert "--data-dir" in capsys.readouterr().err
    assert cli.main(["study", "--report-only", "--out", str(tmp_path / "empty")]) == 2
    assert "run the study first" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["study", "--orders", "conv-bn-relu,relu-first"])
    assert "relu-first" in capsys.readouterr().err


def test_train_config_of_a_study_run(tiny_study):
    spec, runs = _runs(tiny_study)
    run = study.grid(spec)[0]
    cfg = json.loads((study.run_dir(tiny_study, run) / "config.json").read_text())
    assert cfg == run["config"].to_json()
    assert cfg["epochs"] == 2 and cfg["subset"] == 32 and cfg["data"] == "synthetic"
    assert set(cfg) == set(train.TrainConfig().to_json())
