"""The benchmark report marks each target of benchmarks/targets.py ✓ or ✗ with the figure it
measured, on small synthetic runs whose figures pass or fail on purpose."""
import json

import pytest

from benchmarks import report
from benchmarks import targets as tg


def _step(network, order, fmt, variant, median_s, norm="bn"):
    provider = {"none": "eager", "none-compile": "compile"}.get(variant, variant)
    return {"name": f"{network}-{order}-{fmt}-{variant}", "stats": {"median": median_s,
                                                                     "data": [median_s] * 5},
            "extra_info": dict(suite="network", network=network, order=order, norm=norm,
                               provider=provider, variant=variant, batch=128,
                               memory_format=fmt, median_s=median_s, gbps=1.0)}


def _memory(order, provider, saved, eager_saved):
    return {"name": f"memory-{order}-{provider}", "stats": {"median": 1.0},
            "extra_info": dict(suite="memory", kind="unit", network="resnet20",
                               shape="resnet20 16ch 32px", order=order, norm="bn",
                               provider=provider, batch=128, memory_format="nchw",
                               saved_bytes=saved, peak_bytes=2 * saved,
                               saved_ratio_to_eager=saved / eager_saved,
                               peak_ratio_to_eager=saved / eager_saved)}


def _run(fused_s, compile_fused_s, saved_fused):
    """ResNet-20 conv-bn-relu NCHW: none 100 ms, eager 120 ms, compile 110 ms; the fused,
    compiled-fused and bn-conv-relu saved figures given."""
    benches = [_step("resnet20", "conv-bn-relu", "nchw", v, s, "none" if v == "none" else "bn")
               for v, s in (("none", 0.100), ("eager", 0.120), ("fused", fused_s),
                            ("compile", 0.110), ("compile-fused", compile_fused_s))]
    benches += [_memory("bn-conv-relu", "eager", 1000, 1000),
                _memory("bn-conv-relu", "fused", saved_fused, 1000)]
    return {"datetime": "2026-12-01T10:00:00", "benchmarks": benches,
            "machine_info": {"cpu": {"count": 2}, "bnorder": {"threads": 2, "device": "cpu"}}}


def _target_line(text: str, target: str) -> str:
    lines = [line for line in text.splitlines() if tg.BY_NAME[target].figure in line]
    assert len(lines) == 1, (target, lines)
    return lines[0]


def test_passing_figures_are_marked_with_a_tick():
    # fused 105 ms: tax +5.0 %, 1.14x eager; compiled fused 100 ms: 1.10x compile; cut 40 %
    text = report.render(_run(0.105, 0.100, 600))
    assert _target_line(text, "bn-tax-resnet20").startswith("| ✓ |")
    assert "+5.0 %" in _target_line(text, "bn-tax-resnet20")
    assert "1.14×" in _target_line(text, "fused-vs-eager")
    assert _target_line(text, "fused-vs-eager").startswith("| ✓ |")
    assert "1.10×" in _target_line(text, "compile-fused-vs-compile")
    assert _target_line(text, "compile-fused-vs-compile").startswith("| ✓ |")
    assert _target_line(text, "saved-bytes-bn-conv-relu").startswith("| ✓ |")
    assert "+40.0 %" in _target_line(text, "saved-bytes-bn-conv-relu")
    # networks the run did not time are not passed
    assert "not measured" in _target_line(text, "bn-tax-vgg16")
    assert _target_line(text, "bn-tax-vgg16").startswith("| – |")


def test_failing_figures_are_marked_with_a_cross():
    # fused 125 ms: tax +25.0 %, 0.96x eager; compiled fused 121 ms: 0.91x; cut 20 %
    text = report.render(_run(0.125, 0.121, 800))
    for name, figure in (("bn-tax-resnet20", "+25.0 %"), ("fused-vs-eager", "0.96×"),
                         ("compile-fused-vs-compile", "0.91×"),
                         ("saved-bytes-bn-conv-relu", "+20.0 %")):
        line = _target_line(text, name)
        assert line.startswith("| ✗ |") and figure in line, line
    # the per-cell marks of the tables agree
    step_row = next(line for line in text.splitlines()
                    if line.startswith("| resnet20 | conv-bn-relu | nchw |"))
    assert "+25.0 % ✗" in step_row and "0.96× ✗" in step_row and "0.91× ✗" in step_row


def test_the_worst_cell_decides():
    data = _run(0.105, 0.100, 600)
    # a second layout where fused pays 12 %: the target fails, quoting that cell
    data["benchmarks"] += [_step("resnet20", "conv-bn-relu", "nhwc", v, s,
                                 "none" if v == "none" else "bn")
                           for v, s in (("none", 0.100), ("eager", 0.130), ("fused", 0.112))]
    verdict = next(v for v in tg.evaluate(tg.from_benchmarks(data))
                   if v.target.name == "bn-tax-resnet20")
    assert verdict.ok is False
    assert verdict.worst["format"] == "nhwc"
    assert verdict.worst["value"] == pytest.approx(0.12)
    assert [c["ok"] for c in sorted(verdict.cells, key=lambda c: c["format"])] == [True, False]


def test_profile_rows_are_marked_too():
    rows = [dict(network="resnet20", order="conv-bn-relu", format="nchw", batch=128,
                 providers={p: dict(step_ms=ms, conv_ms=ms / 2, conv_share=0.5, conv_gflops=100)
                            for p, ms in (("none", 100.0), ("eager", 120.0), ("fused", 108.0))})]
    text = report.render(dict(gemm_gflops=150.0, threads=2, machine="cpu-2core",
                              datetime="2026-12-01T10:00:00", rows=rows))
    assert _target_line(text, "bn-tax-resnet20").startswith("| ✓ |")       # +8.0 %
    assert "+8.0 %" in _target_line(text, "bn-tax-resnet20")
    assert "not measured" in _target_line(text, "compile-fused-vs-compile")


def test_canonical_files_are_named_by_suite_and_machine_and_slimmed(tmp_path):
    written = report.write_canonical(_run(0.105, 0.100, 600), folder=tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["cpu-2core-memory-resnet20.json", "cpu-2core-memory-resnet20.md",
                     "cpu-2core-networks-resnet20.json", "cpu-2core-networks-resnet20.md"]
    data = json.loads((tmp_path / "cpu-2core-networks-resnet20.json").read_text())
    assert {b["extra_info"]["suite"] for b in data["benchmarks"]} == {"network"}
    assert all("data" not in b["stats"] and "median" in b["stats"] for b in data["benchmarks"])
    assert "2026-12-01" in (tmp_path / "cpu-2core-networks-resnet20.md").read_text()


def test_bad_input_is_refused_with_the_reason(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": 3}')
    with pytest.raises(SystemExit):
        report.main([str(bad)])
    assert "not a benchmark JSON" in capsys.readouterr().err
    undated = tmp_path / "undated.json"
    undated.write_text(json.dumps([{"shape": "s", "order": "conv-bn-relu", "format": "nchw",
                                    "mode": "fwd", "ms": {"conv+relu": 1.0, "fused": 1.1},
                                    "tax": {"fused": 0.1}}]))
    with pytest.raises(SystemExit):
        report.main([str(undated), "--canonical"])
    assert "--machine" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main([str(undated), "--canonical", "--machine", "cpu-2core"])
    assert "--date" in capsys.readouterr().err
