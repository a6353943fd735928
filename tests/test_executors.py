"""bnorder.executors: `bnorder study --workers 2` and `--executor ray` train the same runs as a
sequential study at the same thread count (same metrics, same report tables), and a worker
killed mid-run resumes from its last checkpoint."""
import json
import re

import pytest
import torch

from bnorder import cli, executors, study, train

TINY = ["--models", "cnn", "--orders", "conv-bn-relu", "--seeds", "0,1", "--epochs", "2",
        "--subset", "32", "--test-subset", "32", "--batch-size", "16", "--data", "synthetic",
        "--no-progress", "--lr", "0.05", "--bench-rounds", "0", "--backends", "fused"]
# the run killed once, at the first step of its second epoch (after epoch 1's checkpoint)
VICTIM = "conv-bn-relu/fused/seed1"
# tables whose every cell is a function of the runs' deterministic metrics
TABLES = ("## Final accuracy", "### All pairs")


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """The grid trained one run after another in this process, at one thread: the pool's
    workers (2 cores / 2 workers) and the Ray tasks (1 CPU each) train at one thread too,
    and the thread count changes the rounding of the reductions."""
    out = tmp_path_factory.mktemp("sequential")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["study", *TINY, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _runs(out):
    return {p.parent.relative_to(out): p.parent for p in out.glob("runs/**/done.json")}


def _tables(md: str, heading: str):
    part = md.split(heading, 1)[1].split("\n#", 1)[0]
    return [line for line in part.splitlines() if line.startswith("|")]


def _tta_epochs(md: str):
    # the time-to-accuracy table without its wall-clock column
    return [row.split("|")[1:5] for row in _tables(md, "## Time to accuracy")]


def assert_same_study(out, ref):
    runs, ref_runs = _runs(out), _runs(ref)
    assert len(ref_runs) == 4 and set(runs) == set(ref_runs)
    for rel, folder in ref_runs.items():
        mine = train.read_jsonl(runs[rel] / "metrics.jsonl")
        theirs = train.read_jsonl(folder / "metrics.jsonl")
        assert train.deterministic_fields(mine) == train.deterministic_fields(theirs), rel
        assert (json.loads((runs[rel] / "gradflow.json").read_text())
                == json.loads((folder / "gradflow.json").read_text())), rel
    md, ref_md = (out / "report.md").read_text(), (ref / "report.md").read_text()
    for heading in TABLES:
        assert _tables(md, heading) == _tables(ref_md, heading) != []
    assert _tta_epochs(md) == _tta_epochs(ref_md) != []
    assert "4 of 4 runs finished" in md


def assert_resumed(out):
    """The victim was killed after epoch 1's checkpoint and resumed from it: the checkpoint
    predates the kill (a restart from scratch would have rewritten it)."""
    victim = next(f for f in _runs(out).values() if VICTIM in str(f))
    marker = victim / executors.KILL_MARKER
    assert marker.exists(), "the run was never killed: the test is vacuous"
    assert (victim / "checkpoints" / "epoch-0001.pt").stat().st_mtime_ns <= \
        marker.stat().st_mtime_ns
    assert [r["epoch"] for r in train.read_jsonl(victim / "metrics.jsonl")] == [1, 2]
    killed = [f for f in _runs(out).values() if (f / executors.KILL_MARKER).exists()]
    assert killed == [victim]


def test_two_workers_match_sequential_and_resume_a_killed_worker(sequential, tmp_path,
                                                                 monkeypatch, capsys):
    monkeypatch.setattr(executors, "cores", lambda: 2)     # one thread per worker
    monkeypatch.setenv(executors.KILL_ENV, f"1:{VICTIM}")
    out = tmp_path / "pool"
    assert cli.main(["study", *TINY, "--workers", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "a worker process died" in printed and "resume from their last checkpoint" in printed
    assert re.search(r"\[4/4\] .*\[worker [12]\]", printed)
    spec = json.loads((out / "study.json").read_text())
    assert spec["executor"] == {"executor": "local", "workers": 2, "threads_per_worker": 1,
                                "gpus": []}
    assert_resumed(out)
    assert_same_study(out, sequential)
    # a rerun finds every run finished and trains nothing
    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/**/done.json")}
    assert cli.main(["study", *TINY, "--workers", "2", "--out", str(out)]) == 0
    assert "(4 already finished)" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in out.glob("runs/**/done.json")}


def test_ray_matches_sequential_and_retries_a_killed_task(sequential, tmp_path, monkeypatch,
                                                          capsys):
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e .[ray]")
    # Ray's worker processes inherit the environment of the instance: set it before init
    monkeypatch.setenv(executors.KILL_ENV, f"1:{VICTIM}")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    try:
        out = tmp_path / "ray"
        assert cli.main(["study", *TINY, "--executor", "ray", "--out", str(out)]) == 0
    finally:
        ray.shutdown()
    printed = capsys.readouterr().out
    assert re.search(r"\[4/4\] .*\[\S+ pid \d+\]", printed)
    spec = json.loads((out / "study.json").read_text())
    assert spec["executor"]["executor"] == "ray" and spec["executor"]["cpus_per_run"] == 1
    assert spec["executor"]["gpus_per_run"] == 0
    assert_resumed(out)
    assert_same_study(out, sequential)


def test_pool_gives_up_after_max_retries_and_a_rerun_resumes(tmp_path, monkeypatch, capsys):
    """With --max-retries 0 a killed worker stops the study with a message naming its runs;
    the killed run's checkpoint is kept, and the same command again finishes the study."""
    monkeypatch.setattr(executors, "cores", lambda: 2)
    monkeypatch.setenv(executors.KILL_ENV, "1:conv-bn-relu/fused/seed0")
    args = ["study", *TINY, "--seeds", "0", "--out", str(tmp_path)]
    assert cli.main([*args, "--workers", "2", "--max-retries", "0"]) == 2
    err = capsys.readouterr().err
    assert "stopped 1 times: giving up" in err and "cnn conv-bn-relu fused seed 0" in err
    victim = next(tmp_path.glob("runs/cnn/conv-bn-relu/fused/seed0-*"))
    assert (victim / executors.KILL_MARKER).exists()
    assert not (victim / "done.json").exists()
    assert train.checkpoint_paths(victim)[-1].name == "epoch-0001.pt"
    assert cli.main(args) == 0            # the same study again, here one run at a time
    assert len(_runs(tmp_path)) == 2 and (victim / "done.json").exists()
    assert (victim / "checkpoints" / "epoch-0001.pt").stat().st_mtime_ns <= \
        (victim / executors.KILL_MARKER).stat().st_mtime_ns


def test_a_run_error_in_a_worker_stops_the_study_with_its_message(tmp_path, capsys):
    """A corrupt checkpoint met by a worker process is reported as in a sequential study."""
    args = cli.build_parser().parse_args(["study", *TINY, "--seeds", "0"])
    run = study.grid(study.resolve(args))[0]
    folder = study.run_dir(tmp_path, run)
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(run["config"].to_json()))
    (folder / "checkpoints" / "epoch-0001.pt").write_bytes(b"not a checkpoint")
    assert cli.main(["study", *TINY, "--seeds", "0", "--workers", "2",
                     "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "epoch-0001.pt is truncated or corrupt" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "must be at least 1"),
    (["--executor", "spark"], "invalid choice: 'spark'"),
    (["--address", "auto"], "--address needs --executor ray"),
    (["--executor", "ray", "--workers", "2"], "--workers is for the local executor"),
])
def test_bad_executor_arguments(tmp_path, capsys, argv, message):
    try:
        code = cli.main(["study", *TINY, *argv, "--out", str(tmp_path)])
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_ray_missing_names_the_extra(tmp_path, monkeypatch, capsys):
    import sys
    monkeypatch.setitem(sys.modules, "ray", None)           # import ray raises ImportError
    assert cli.main(["study", *TINY, "--executor", "ray", "--out", str(tmp_path)]) == 2
    assert "pip install -e .[ray]" in capsys.readouterr().err


def test_display_follows_every_worker():
    cfg = train.TrainConfig(model="cnn", epochs=2, batch_size=16, subset=32, data="synthetic")
    jobs = [executors.Job(f"run {i}", cfg, f"/nowhere/{i}") for i in range(3)]
    d = executors._Display(jobs, n_train=100, enabled=False)
    per_run = 2 * 32                        # 2 epochs × 2 full batches of 16
    assert d.progress.tasks[0].total == 3 * per_run
    d.event(("start", "/nowhere/0", "worker 1"))
    d.event(("start", "/nowhere/1", "worker 2"))
    d.event(("step", "/nowhere/0", 40))
    d.event(("step", "/nowhere/1", 16))
    rows = {t.description: t.completed for t in d.progress.tasks[1:]}
    assert rows == {"worker 1: run 0": 40, "worker 2: run 1": 16}
    assert d.progress.tasks[0].completed == 56
    d.finished_run("/nowhere/0")
    assert [t.description for t in d.progress.tasks[1:]] == ["worker 2: run 1"]
    assert d.progress.tasks[0].completed == per_run + 16
    assert d.progress.tasks[0].description == "study: 1/3 runs finished"
