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
