"""bnorder: the fused package, the networks and the study harness, plus the C++ CPU kernels.

The extension compiles with -O3, OpenMP and -march=native: it is built on the machine that
runs it (`make setup`), never shipped as a binary. BNORDER_CXXFLAGS replaces the arch flag.
"""
import glob
import os
import runpy

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

arch = os.environ.get("BNORDER_CXXFLAGS", "-march=native").split()
# The supported torch/triton range, from the one place that states it.
pins = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fused",
                                   "_pins.py"))

setup(
    name="bnorder",
    version="0.1.0",
    description="Fast, equally fused batch-norm placements and a study of where BN belongs",
    packages=find_packages(include=["fused", "fused.*", "models", "models.*", "bnorder",
                                    "bnorder.*"]),
    python_requires=">=3.10",
    # Loose bounds: `pip install --no-build-isolation -e .` goes into a user's own torch
    # environment (requirements.txt holds the exact set `make setup` installs). torch's CUDA
    # wheels bring their own triton; the extra is for the interpreter on CPU-only torch.
    install_requires=[f"torch{pins['TORCH_RANGE']}", "numpy>=1.24", "tqdm>=4.60", "rich>=13",
                      "matplotlib>=3.7", "scipy>=1.10"],
    ext_modules=[
        CppExtension(
            "fused._C",
            sorted(glob.glob("csrc/*.cpp")),
            extra_compile_args=["-O3", "-fopenmp", "-std=c++17", *arch],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["bnorder=bnorder.cli:main"]},
    # `bnorder study --executor ray`; `make test` installs it for the tests that exercise it.
    extras_require={"ray": ["ray==2.60.0"], "triton": [f"triton{pins['TRITON_RANGE']}"],
                    "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6"]},
)
