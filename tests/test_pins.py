"""One torch/triton pair (fused/_pins.py) for requirements.txt, setup.py, pyproject.toml and
`make setup`'s choice between the CPU and the CUDA build of torch."""
import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from fused import _pins

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bnorder" / "install_requirements.py"


def _requirements() -> dict:
    reqs = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            reqs[req.name] = req.specifier
    return reqs


def test_requirements_pin_the_pair():
    reqs = _requirements()
    assert reqs["torch"] == SpecifierSet(f"=={_pins.TORCH}")
    assert reqs["triton"] == SpecifierSet(f"=={_pins.TRITON}")


def test_triton_pin_is_what_the_torch_pin_requires():
    minor = ".".join(_pins.TORCH.split(".")[:2])
    assert _pins.TRITON == _pins.TRITON_FOR_TORCH[minor]


def test_ranges_cover_every_tested_pair():
    torch_range = SpecifierSet(_pins.TORCH_RANGE)
    triton_range = SpecifierSet(_pins.TRITON_RANGE)
    assert torch_range.contains(_pins.TORCH)
    for minor, triton in _pins.TRITON_FOR_TORCH.items():
        assert torch_range.contains(f"{minor}.0") and torch_range.contains(f"{minor}.9")
        assert triton_range.contains(triton)
    assert not torch_range.contains("2.15.0") and not torch_range.contains("2.12.1")


def test_pyproject_builds_against_the_supported_range():
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    torch_reqs = [Requirement(r) for r in build if Requirement(r).name == "torch"]
    assert [r.specifier for r in torch_reqs] == [SpecifierSet(_pins.TORCH_RANGE)]


def test_installed_package_declares_the_runtime_dependencies():
    """setup.py's install_requires as pip recorded it (make setup installs the package)."""
    try:
        declared = importlib.metadata.requires("bnorder") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("bnorder is not installed (make setup installs it)")
    reqs = {Requirement(r).name: Requirement(r) for r in declared}
    assert reqs["torch"].specifier == SpecifierSet(_pins.TORCH_RANGE)
    assert reqs["triton"].specifier == SpecifierSet(_pins.TRITON_RANGE)
    assert reqs["triton"].marker is not None  # an extra: CUDA torch brings its own triton
    for runtime in ("numpy", "tqdm", "rich", "matplotlib", "scipy"):
        assert runtime in reqs and reqs[runtime].marker is None, runtime


def test_untested_names_the_problem():
    assert _pins.untested("2.13.0+cpu", "3.7.1") is None
    assert _pins.untested("2.14.1+cu128", "3.8.0") is None
    assert _pins.untested("2.13.0", None) is None
    assert _pins.untested("2.13.0+cpu", "3.8.0") is None  # the interpreter's other end
    assert "requires 3.7.1" in _pins.untested("2.13.0", "3.9.0")
    assert "outside the tested range" in _pins.untested("2.15.0", "3.9.0")
    assert "outside the tested range" in _pins.untested("2.12.1", "3.6.0")


# ---- make setup: which torch build -------------------------------------------------------

def _fake_nvidia_smi(tmp_path: Path, body: str) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "nvidia-smi"
    exe.write_text("#!/bin/sh\n" + body + "\n")
    exe.chmod(0o755)
    return str(bin_dir)


def _dry_run(path: str, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "BNORDER_TORCH"}
    full.update(PATH=path, **env)
    return subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], capture_output=True,
                          text=True, env=full, timeout=120)


def _without_nvidia_smi() -> str:
    return os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep)
                           if not (Path(d) / "nvidia-smi").exists())


CUDA_TORCH = f"torch=={_pins.TORCH},!={_pins.TORCH}+cpu"


def test_a_listed_gpu_selects_the_cuda_build(tmp_path):
    fake = _fake_nvidia_smi(tmp_path, 'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1234)"')
    out = _dry_run(fake + os.pathsep + _without_nvidia_smi())
    assert out.returncode == 0, out.stderr
    assert "torch build: cuda" in out.stdout and "NVIDIA H100" in out.stdout
    assert CUDA_TORCH in out.stdout and "requirements.txt" in out.stdout


@pytest.mark.parametrize("body", ['echo "NVIDIA-SMI has failed because it could not '
                                  'communicate with the NVIDIA driver."; exit 9',
                                  'echo "No devices found."'], ids=["no-driver", "no-device"])
def test_nvidia_smi_without_a_gpu_selects_the_plain_pin(tmp_path, body):
    out = _dry_run(_fake_nvidia_smi(tmp_path, body) + os.pathsep + _without_nvidia_smi())
    assert out.returncode == 0, out.stderr
    assert "torch build: cpu" in out.stdout and "!=" not in out.stdout


def test_no_nvidia_smi_selects_the_plain_pin():
    out = _dry_run(_without_nvidia_smi())
    assert out.returncode == 0, out.stderr
    assert "torch build: cpu" in out.stdout and CUDA_TORCH not in out.stdout


def test_override_and_bad_override():
    out = _dry_run(_without_nvidia_smi(), BNORDER_TORCH="cuda")
    assert out.returncode == 0 and CUDA_TORCH in out.stdout
    bad = _dry_run(_without_nvidia_smi(), BNORDER_TORCH="gpu")
    assert bad.returncode != 0 and "BNORDER_TORCH='gpu' is not one of" in bad.stderr


@pytest.mark.slow
def test_requirements_resolve_from_the_registry_alone():
    """What a machine without a local CPU wheel resolves (metadata only; minutes, network)."""
    env = dict(os.environ, PIP_FIND_LINKS="")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
         "--isolated", "-r", str(ROOT / "requirements.txt"), "--only-binary=:all:"],
        capture_output=True, text=True, env=env, timeout=1800)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"torch-{_pins.TORCH} " in out.stdout and f"triton-{_pins.TRITON}" in out.stdout
