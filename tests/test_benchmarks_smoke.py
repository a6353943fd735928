"""`pytest benchmarks/ --benchmark-only --quick` runs (the suites, the allocator set-up, the
interleaving glue) and its JSON turns into the Markdown report."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import common, report

ROOT = Path(__file__).resolve().parents[1]
TIMED_KEYS = {"bytes_moved", "gbps", "copy_bandwidth_gbps", "memory_format", "fits_in_cache",
              "ratio_to_eager", "median_s"}


def test_quick_suite_and_report(tmp_path):
    out = tmp_path / "quick.json"
    env = {**os.environ, **common.ALLOCATOR_ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "--quick", "-q",
         "-p", "no:cacheprovider", f"--benchmark-json={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    extra = [b["extra_info"] for b in data["benchmarks"]]
    assert {e["suite"] for e in extra} == {"unit", "network", "memory"}
    for e in extra:
        if e["suite"] != "memory":
            assert TIMED_KEYS | ({"bn_tax"} if e["norm"] != "none" else set()) <= set(e), e
            assert e["median_s"] > 0 and e["gbps"] > 0
        else:
            assert e["saved_bytes"] > 0 and e["peak_bytes"] > 0
    assert any("compile_s" in e for e in extra)
    assert {e["provider"] for e in extra if e["suite"] == "unit"} == {"eager", "fused",
                                                                     "compile"}
    text = report.render(data)
    for heading in ("Training step", "One unit", "Memory", "BN tax"):
        assert heading in text


def test_benchmarks_refuse_to_run_without_allocator_settings():
    """Started from inside another program, the suite cannot re-execute itself: it must
    stop and say how to run."""
    env = {k: v for k, v in os.environ.items() if k not in common.ALLOCATOR_ENV}
    code = ("import pytest, sys; sys.exit(pytest.main(['benchmarks', '--quick', '-q', "
            "'--collect-only', '-p', 'no:cacheprovider']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "make bench" in proc.stdout + proc.stderr


def test_units_fixed_cost_table(tmp_path, capsys, monkeypatch):
    """`python -m benchmarks.units --shapes tiny --batch 2` times every order's tiny unit
    (its fixed cost per unit and step) and writes one row per order."""
    from benchmarks import units
    # Marks the allocator settings as present, so that main() does not re-execute the test
    # process to apply them (they only matter for the timings' quality, not checked here).
    for key, value in common.ALLOCATOR_ENV.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "tiny.json"
    units.main(["--shapes", "tiny", "--batch", "2", "--formats", "nchw", "--modes", "fwdbwd",
                "--providers", "eager,fused", "--rounds", "2", "--inner", "2",
                "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [r["order"] for r in rows] == ["conv-bn-relu", "conv-relu-bn", "bn-conv-relu"]
    for r in rows:
        assert r["shape"] == units.TINY[0] and set(r["ms"]) == {"conv+relu", "eager", "fused"}
        assert all(v > 0 for v in r["ms"].values())
    assert "batch 2" in capsys.readouterr().out


def test_units_medians_over_processes(tmp_path, monkeypatch):
    """--processes 2 runs the suite in two fresh processes and reports each tax as the
    median of theirs with its range, which contains the median."""
    from benchmarks import units
    for key, value in common.ALLOCATOR_ENV.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "two.json"
    units.main(["--shapes", "tiny", "--batch", "2", "--formats", "nchw", "--modes", "fwd",
                "--providers", "fused", "--rounds", "1", "--inner", "1", "--processes", "2",
                "--json", str(out)])
    rows = json.loads(out.read_text())
    assert len(rows) == 3 and all(r["runs"] == 2 for r in rows)
    for r in rows:
        low, high = r["tax_range"]["fused"]
        assert low <= r["tax"]["fused"] <= high
    assert units._without_options(["--rounds", "3", "--processes", "4", "--json=x", "-v"],
                                  ("--processes", "--json")) == ["--rounds", "3", "-v"]


def assert_rejected(main, argvs):
    """Each argv makes the command-line entry point exit with argparse's usage code 2."""
    for argv in argvs:
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert exit.value.code == 2, argv


def test_units_rejects_bad_arguments():
    from benchmarks import units
    assert_rejected(units.main, (["--shapes", "9"], ["--shapes", "x"], ["--batch", "0"],
                                 ["--processes", "0"]))


def test_profile_step_counts_every_convolution_flop():
    """Forward, input gradient and weight gradient: three convolutions' worth of FLOPs."""
    import torch
    from benchmarks import profile_step
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, bias=False)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    forward = 2 * 2 * 6 * 5 * 5 * 4 * 3 * 3
    assert profile_step.conv_flops(lambda: conv(x).sum().backward()) == 3 * forward
    with torch.no_grad():
        assert profile_step.conv_flops(lambda: conv(x)) == forward


def test_profile_step_times_the_convolutions_inside_fused_nodes():
    """The fused units call ATen's convolution from C++: the profile must still see it, once
    per call (not again for the calls nested inside it), and see none in a step without one.
    Only the presence of the convolution's time is checked: comparing it with a wall time
    taken around it fails by chance on a loaded machine."""
    import torch
    import fused
    from benchmarks import profile_step
    for order in fused.ORDERS:
        unit = fused.make_unit(order, 8, 8, 3, 1, 1, norm="bn", backend="fused").train()
        x = torch.randn(16, 8, 24, 24, requires_grad=True)

        def step():
            unit(x).sum().backward()
        step()
        assert profile_step.conv_seconds(step) > 0, order
    linear = torch.nn.Linear(64, 64)
    assert profile_step.conv_seconds(lambda: linear(torch.randn(8, 64)).sum().backward()) == 0


def test_profile_step_row_and_targets():
    from benchmarks import profile_step
    row = profile_step.profile("resnet20", "conv-relu-bn", "nchw", rounds=1, batch=2,
                               providers=("none", "eager", "fused"), profiled_rounds=1)
    assert set(row["providers"]) == {"none", "eager", "fused"}
    assert row["conv_gflop"] > 0
    for p in row["providers"].values():
        # Medians of separate rounds: on a noisy machine the convolutions' median can exceed
        # the step's, so only their presence is checked.
        assert p["conv_ms"] > 0 and p["step_ms"] > 0
    from benchmarks import targets
    verdicts = {v.target.name: v for v in targets.evaluate(targets.from_profile([row]))}
    eager, none, fused_ = (row["providers"][p]["step_ms"] for p in ("eager", "none", "fused"))
    [tax] = verdicts["bn-tax-resnet20"].cells
    assert abs(tax["value"] - (fused_ / none - 1)) < 1e-9 and tax["ok"] == (fused_ <= 1.1 * none)
    [speed] = verdicts["fused-vs-eager"].cells
    assert abs(speed["value"] - eager / fused_) < 1e-9
    assert verdicts["compile-fused-vs-compile"].ok is None   # no compile provider profiled
    try:
        profile_step.profile("resnet20", "conv-relu-bn", "nchw", 1, 2, providers=("eager",))
    except ValueError as error:
        assert "none" in str(error)
    else:
        raise AssertionError("a profile without the none network was accepted")


def test_profile_step_rejects_bad_arguments():
    from benchmarks import profile_step
    assert_rejected(profile_step.main, (["--orders", "bn-relu-conv"], ["--formats", "nhcw"],
                                        ["--rounds", "0"], ["--batch", "-1"]))


def test_relu_mode_ratios_cover_every_primitive_and_mode():
    """`python -m benchmarks.primitives --relu-modes` reports (not asserts) how much each ReLU
    placement costs per primitive; here only its structure is checked."""
    import torch
    import fused
    from benchmarks import primitives
    if fused.extension_error() is not None:
        pytest.skip("the C++ extension did not build")
    for dtype in (torch.float32, torch.bfloat16):
        ratios = primitives.relu_mode_ratios((2, 3, 5, 7), True, dtype, rounds=1)
        assert set(ratios) == {(p, m) for p in ("stats", "apply", "backward_reduce",
                                                "backward_apply") for m in ("after", "before")}
        assert all(r > 0 for r in ratios.values())
    assert_rejected(primitives.main, (["--rounds", "0"],))
