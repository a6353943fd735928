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
    def wrong_apply(t, mean, scale, shift, relu_mode):
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


def test_gpu_path_runs_the_triton_kernels_and_the_conv_rows():
    """`check --gpu`'s path with the Triton backend, on CPU tensors in the interpreter: the
    quick validation with both conv_impl values, then the timing table including the fused
    convolution variants, timed by CUDA-event code on fake events."""
    from rich.console import Console

    from fused.triton import roofline
    from tests.fake_cuda import Log, event_timer
    console = Console(width=220, record=True, force_terminal=False)
    log = Log()
    layer = roofline.Layer("tiny", 2, 16, 4, 4, 16, 3, 3, 1, 1)
    status = check.gpu_check(console, "cpu", event_timer(log), backend="triton", quick=True,
                             layer=layer, dtype=torch.float32, compiler=lambda f: f,
                             gpu_name="NVIDIA A100-SXM4-80GB", orders=("conv-bn-relu",))
    text = console.export_text()
    assert status == 0, text
    assert "4/4 checks passed" in text   # conv_impl aten, triton × train, eval
    for name in ("stats (triton)", "conv (triton)", "conv + stats epilogue",
                 "conv + norm prologue", "conv-bn-relu fwd+bwd"):
        assert name in text
    # copy; 4 primitives × fused, eager, compile; 3 conv variants × fused, cuDNN; 2 unit modes
    assert log.names().count("elapsed_time") == 1 + 4 * 3 + 3 * 2 + 2 * 3
