"""`python -m fused.check` / `bnorder check`: the self-check runs, reports and fails loudly."""
import pytest
import torch

from fused import _backend, check

pytestmark = pytest.mark.triton


def test_check_triton_interpreter_quick(capsys):
    assert check.main(["--backend", "triton", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "12/12 checks passed" in out
    assert "interpreter" in out and "bn-conv-relu" in out


def test_check_cpu_backend_quick(capsys):
    assert check.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "6/6 checks passed" in out
    assert ("cpp" in out) or ("C++ extension not loaded" in out)


def test_check_reports_a_wrong_kernel(capsys, monkeypatch):
    def wrong_apply(t, scale, shift, relu_mode):
        return torch.zeros_like(t)

    monkeypatch.setattr(_backend._reference, "apply", wrong_apply)
    assert check.main(["--backend", "reference", "--quick"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "checks passed" in out


def test_check_row_for_a_crash_is_a_failure(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(check, "check_case", boom)
    rows = check.battery("reference", quick=True)
    assert rows and not any(r.passed for r in rows)
    assert "kernel exploded" in rows[0].note
