"""Install requirements.txt into the running Python, with the torch build this machine needs.

    python bnorder/install_requirements.py [--dry-run]

`make setup` runs it with the project's venv. Where `nvidia-smi -L` lists a GPU it asks pip
for the CUDA build of the pinned torch (the registry's default Linux build, which also brings
the triton that requirements.txt pins); elsewhere it takes the pin as it is, which is the CPU
build where a local CPU wheel is configured for pip, and the registry's default build
otherwise. BNORDER_TORCH=cpu|cuda overrides the detection. It runs before torch is
installed, so it imports neither torch nor the package (fused/_pins.py is loaded by path).
"""
from __future__ import annotations

import argparse
import os
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements.txt"
CHOICES = ("auto", "cpu", "cuda")


def pins() -> dict:
    return runpy.run_path(str(ROOT / "fused" / "_pins.py"))


def gpus() -> List[str]:
    """The GPUs `nvidia-smi -L` lists (empty where it is missing, fails or times out)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.startswith("GPU ")]


def variant(env: Optional[str] = None) -> Tuple[str, str]:
    """("cuda" or "cpu", why): BNORDER_TORCH if set, else what nvidia-smi finds."""
    value = (os.environ.get("BNORDER_TORCH", "") if env is None else env).strip().lower()
    value = value or "auto"
    if value not in CHOICES:
        raise SystemExit(f"BNORDER_TORCH={value!r} is not one of {CHOICES}")
    if value != "auto":
        return value, f"BNORDER_TORCH={value}"
    found = gpus()
    if found:
        return "cuda", f"nvidia-smi -L lists {len(found)} GPU(s): {found[0]}"
    return "cpu", "nvidia-smi -L lists no GPU"


def pip_command(kind: str, python: str = sys.executable) -> List[str]:
    cmd = [python, "-m", "pip", "install", "--disable-pip-version-check", "-q",
           "-r", str(REQUIREMENTS)]
    if kind == "cuda":
        # Same version as the pin, any build but the CPU one: pip intersects this with the
        # requirements line, so a local CPU wheel cannot win over the registry's CUDA build.
        torch = pins()["TORCH"]
        cmd.append(f"torch=={torch},!={torch}+cpu")
    return cmd


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="print the choice and the pip command, install nothing")
    args = parser.parse_args(argv)
    kind, reason = variant()
    cmd = pip_command(kind)
    print(f"torch build: {kind} ({reason})")
    print(shlex.join(cmd))
    if args.dry_run:
        return 0
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
