"""fused.triton.aot: the ahead-of-time sweep covers every @triton.jit function, records the
launchers' own GPU choices, flags what must fail, and (in a subprocess without the
interpreter) compiles the covering subset for sm_80 and sm_90 without errors, spills or
shared memory over the limit."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fused.triton import aot, conv, roofline

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def launches():
    return aot.record_launches([roofline.LAYERS["resnet20.stage1"]])


def test_every_jit_function_is_compiled(launches):
    recorded = {launch.kernel for launch in launches}
    assert recorded == set(aot.launched_kernels())
    compiled = recorded | aot.called_helpers(recorded)
    missing = set(aot.package_jit_functions()) - compiled
    assert not missing, f"@triton.jit functions the AOT sweep never compiles: {missing}"


def test_recorded_launches_are_the_launchers_gpu_choice(launches):
    layer = roofline.LAYERS["resnet20.stage1"]
    fwd = [l for l in launches if l.kernel == "conv_fwd_kernel" and l.dtype == torch.float16]
    expected = conv.forward_config(layer.n, layer.c, layer.o, layer.p, layer.q,
                                   torch.float16, gpu=True).meta
    assert fwd and all({k: l.kwargs[k] for k in expected} == expected for l in fwd)
    assert expected["num_warps"] == 8  # the GPU pipeline, not the interpreter's
    tf32 = {l.kwargs["PRECISION"] for l in launches
            if l.kernel == "conv_fwd_kernel" and l.dtype == torch.float32}
    assert tf32 == {"ieee", "tf32"}


def test_problems_are_flagged():
    variant = aot.Variant("conv_fwd_kernel", "fused.triton.conv_kernels", 80, {}, {}, {}, {})
    assert aot.problems(variant, aot.Result(regs=128, shared=1024)) == []
    assert aot.problems(variant, aot.Result(regs=255, spill_stores=8, shared=1024)) == [
        "spills"]
    assert aot.problems(variant, aot.Result(regs=128, shared=164 * 1024)) == [
        "shared memory"]
    variant.arch = 90  # 164 KB fits an H100 block
    assert aot.problems(variant, aot.Result(regs=128, shared=164 * 1024)) == []
    assert aot.problems(variant, aot.Result(error="CompilationError: x")) == ["error"]


def test_bad_arguments_are_named(capsys):
    with pytest.raises(SystemExit) as exit_info:
        aot.main(["--arch", "sm_70"])
    assert exit_info.value.code == 2
    assert "unknown target 'sm_70'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        aot.main(["--layers", "resnet21.stage9"])
    assert "unknown layer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        aot.main([])  # this process interprets: the kernels cannot be compiled
    assert "TRITON_INTERPRET is set" in capsys.readouterr().err


def test_covering_subset_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "fused.triton.aot", "--quick"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1800)
    tail = done.stdout[-3000:] + done.stderr[-3000:]
    assert "0 compile errors, 0 with spills, 0 over the shared memory limit" in done.stdout, tail
    assert done.returncode == 0, tail


def test_no_kernel_uses_atomics():
    """Determinism and interpreter/GPU agreement rest on fixed-order merges, not atomics."""
    import inspect
    for name, kernel in aot.jit_kernels().items():
        assert "atomic_" not in inspect.getsource(kernel.fn), name
