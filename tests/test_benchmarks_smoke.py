"""`pytest benchmarks/ --benchmark-only --quick` runs (the suites, the allocator set-up, the
interleaving glue) and its JSON turns into the Markdown report."""
import json
import os
import subprocess
import sys
from pathlib import Path

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


def test_units_rejects_bad_arguments():
    from benchmarks import units
    for argv in (["--shapes", "9"], ["--shapes", "x"], ["--batch", "0"],
                 ["--processes", "0"]):
        try:
            units.main(argv)
        except SystemExit as exit:
            assert exit.code == 2, argv
        else:
            raise AssertionError(f"{argv} was accepted")
