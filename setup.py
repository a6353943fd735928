"""bnorder: the fused package, the networks and the study harness, plus the C++ CPU kernels.

The extension compiles with -O3, OpenMP and -march=native: it is built on the machine that
runs it (`make setup`), never shipped as a binary. BNORDER_CXXFLAGS replaces the arch flag.
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

arch = os.environ.get("BNORDER_CXXFLAGS", "-march=native").split()

setup(
    name="bnorder",
    version="0.1.0",
    description="Fast, equally fused batch-norm placements and a study of where BN belongs",
    packages=find_packages(include=["fused", "fused.*", "models", "models.*", "bnorder",
                                    "bnorder.*"]),
    python_requires=">=3.10",
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
    extras_require={"ray": ["ray==2.60.0"]},
)
