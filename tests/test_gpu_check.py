"""`bnorder check --gpu` without a GPU: the whole GPU path (validation battery over fp32, fp16,
bf16 × NCHW, channels_last, then the timing table with roofline shares) runs here with
device="cpu", a CPU backend, a CUDA-event timer on fake events and a stand-in compiler; the
verdicts are checked, including a deliberately wrong op that must fail the validation. The
interpreter run of the Triton backend through the same path: tests/triton/test_check.py."""
import pytest
import torch
from rich.console import Console

from bnorder import cli
from fused import _backend, check
from fused.triton import roofline
from tests.fake_cuda import Log, event_timer

LAYER = roofline.Layer("tiny", 2, 4, 6, 6, 5, 3, 3, 1, 1)
H100 = "NVIDIA H100 80GB HBM3"


def _console():
    return Console(width=220, record=True, force_terminal=False)


def _run(monkeypatch=None, **kwargs):
    console, compiled = _console(), []

    def compiler(fn):
        compiled.append(fn)
        return fn

    log = Log()
    args = dict(device="cpu", timer=event_timer(log), backend="reference", layer=LAYER,
                dtype=torch.float16, compiler=compiler, gpu_name=H100,
                dtypes=(torch.float32, torch.float16, torch.bfloat16), norms=("bn",),
                orders=("conv-relu-bn", "bn-conv-relu"))
    args.update(kwargs)
    status = check.gpu_check(console, **args)
    return status, console.export_text(), compiled, log


def test_gpu_path_validates_every_dtype_and_layout_and_times_every_row():
    status, text, compiled, log = _run()
    assert status == 0, text
    assert "24/24 checks passed" in text          # 3 dtypes × 2 layouts × 2 orders × 2 modes
    for word in ("f32", "f16", "bf16", "nchw", "nhwc s2", "train", "eval"):
        assert word in text
    for name in ("t.clone()", "stats", "apply", "backward_reduce", "backward_apply",
                 "conv-relu-bn fwd+bwd", "bn-conv-relu fwd"):
        assert name in text
    assert f"Timing on {H100}" in text and "roofline" in text
    # the eager primitives and one unit per order went through torch.compile's stand-in
    assert len(compiled) == 4 + 2
    # every timed call was bracketed by CUDA events and waited for
    assert log.names().count("elapsed_time") == log.names().count("event.synchronize") > 0


def test_gpu_path_fails_on_a_wrong_op(monkeypatch):
    """A wrong `apply` (zeros) must fail the training rows, which use it (eval folds the norm
    into the convolution), and the exit status must say so."""
    monkeypatch.setattr(_backend._reference, "apply", lambda t, scale, shift, relu_mode:
                        torch.zeros_like(t))
    status, text, _, _ = _run(timing=False, dtypes=(torch.float16,),
                              orders=("conv-bn-relu",))
    assert status == 1
    train_rows = [line for line in text.splitlines() if " train " in line]
    assert len(train_rows) == 2 and all("FAIL" in line for line in train_rows)
    assert "4/4 checks passed" not in text


def test_gpu_path_fails_on_an_op_wrong_only_in_low_precision(monkeypatch):
    """An op that is right in float32 but drops the low half of bfloat16 results by computing
    in float16 must fail the bfloat16 rows only."""
    real = _backend._reference.apply

    def lossy(t, mean, scale, shift, relu_mode):
        out = real(t, mean, scale, shift, relu_mode)
        return out.half().to(out.dtype) * 1.01 if t.dtype == torch.bfloat16 else out

    monkeypatch.setattr(_backend._reference, "apply", lossy)
    rows = check.battery("reference", False, "cpu", (torch.float32, torch.bfloat16),
                         ("conv-bn-relu",), ("bn",))
    assert {r.dtype for r in rows if not r.passed} == {"bf16"}
    assert all(r.passed for r in rows if r.dtype == "f32")


def test_timing_rows_derive_rates_and_roofline_shares_from_the_roofline_module():
    class Fixed:
        """A timer that reports fixed times per call, to check the arithmetic."""
        def __init__(self):
            self.n = 0

        def seconds(self, fn, calls=1):
            fn()
            self.n += 1
            return 1e-3

    rows = check.timing_table(LAYER, torch.float32, "cpu", Fixed(), backend="reference",
                              compiler=lambda f: f, gpu_name=H100, orders=("conv-bn-relu",))
    by_name = {r.name: r for r in rows}
    apply = by_name["apply (reference)"]
    cost = roofline.kernel_cost("apply_kernel", LAYER, torch.float32, norm_side="output")
    assert apply.bytes == cost.bytes
    assert apply.achieved()[0] == pytest.approx(cost.bytes / 1e-3 / 1e9)
    assert apply.share == pytest.approx(
        roofline.bound_seconds(cost, roofline.GPUS["H100"], torch.float32) / 1e-3)
    assert apply.ratio("eager") == pytest.approx(1.0) and apply.ratio("nope") is None
    unit = by_name["conv-bn-relu fwd+bwd"]
    assert unit.flops >= 3 * LAYER.conv_flops   # forward, input and weight gradient
    assert set(unit.seconds) == {"fused", "eager", "compile"}
    unknown = check.timing_table(LAYER, torch.float32, "cpu", Fixed(), backend="reference",
                                 compiler=lambda f: f, gpu_name="Some Other GPU",
                                 orders=("conv-bn-relu",), providers=("fused", "eager"))
    assert all(r.share is None for r in unknown)
    assert all("compile" not in r.seconds for r in unknown)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
@pytest.mark.parametrize("entry", ["fused", "bnorder"])
def test_check_gpu_without_a_gpu_exits_naming_what_is_missing(entry, capsys):
    status = (check.main(["--gpu"]) if entry == "fused" else cli.main(["check", "--gpu"]))
    err = capsys.readouterr().err
    assert status == 2
    assert "--gpu: device cuda requested, but" in err and "interpreter" in err


def test_check_gpu_rejects_another_backend():
    with pytest.raises(SystemExit) as exit:
        check.main(["--gpu", "--backend", "cpp"])
    assert exit.value.code == 2


def test_check_gpu_on_cuda_runs_the_gpu_path(monkeypatch, capsys):
    """With CUDA reported usable, main() hands the parsed options to gpu_check on cuda."""
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(check, "gpu_check", lambda console, device, **kw: (
        seen.update(kw, device=device), 0)[1])
    assert cli.main(["check", "--gpu", "--no-timing", "--dtype", "bf16", "--layer",
                     "resnet20.stage3"]) == 0
    assert seen["device"] == "cuda" and seen["timing"] is False
    assert seen["dtype"] == torch.bfloat16 and seen["layer"].name == "resnet20.stage3"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_triton_backend_without_gpu_or_interpreter_says_how_to_run(monkeypatch, capsys):
    """Triton's interpreter cannot be switched on once triton is imported (importing fused
    does): the check must say how to rerun instead of failing every row with an
    InterpreterError."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert check.main(["--backend", "triton", "--quick"]) == 1
    out = capsys.readouterr().out
    assert "TRITON_INTERPRET=1 python -m fused.check" in out and "0/1 checks passed" in out


def test_a_kernel_failing_in_the_timing_is_a_reported_row(monkeypatch):
    """A fused kernel that raises when timed (a compile or launch error on a GPU) leaves its
    row without fused figures, names the error, the other rows are still timed, and the exit
    status is 1."""
    def broken(*args, **kwargs):
        raise RuntimeError("out of resource: shared memory")

    monkeypatch.setattr(_backend._reference, "backward_reduce", broken)
    status, text, _, _ = _run(dtypes=(torch.float32,), orders=("bn-conv-relu",), quick=True)
    assert status == 1
    assert "fused FAILED RuntimeError: out of resource: shared memory" in text
    assert "2 timing rows failed" in text   # the primitive and the unit backward using it
    assert "backward_apply (reference)" in text and "bn-conv-relu fwd+bwd" in text
