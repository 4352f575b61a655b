"""Packaging for lookahead_fused. The compiled core `lookahead_fused._C` is built by CMake
(CMakeLists.txt) with ninja; this file only drives it.

The build folder is fixed (build/cmake-<python tag>) so that an editable install
(`pip install --no-build-isolation -e .`) rebuilds incrementally. Extra CMake options
come from the CMAKE_ARGS environment variable, e.g.
    CMAKE_ARGS="-DLOOKAHEAD_FUSED_CPU_ARCH=x86-64-v3 -DLOOKAHEAD_FUSED_CUDA=OFF" pip install .
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        import pybind11  # a build requirement (pyproject.toml)

        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
            *shlex.split(os.environ.get("CMAKE_ARGS", "")),
        ]  # fmt: skip
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir)], check=True)


setup(
    name="lookahead_fused",
    version="0.1.0",
    description="Lookahead fused with SGD/Adam/AdamW: one pass per parameter bucket per step",
    # triton_kernels/ sits beside csrc/ in the tree but installs inside the package
    # (DESIGN.md §3), so it never becomes a top-level module of its own.
    packages=[*find_packages(include=["lookahead_fused", "lookahead_fused.*"]), "lookahead_fused.triton_kernels"],
    package_dir={"lookahead_fused.triton_kernels": "triton_kernels"},
    ext_modules=[CMakeExtension("lookahead_fused._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    # timm and torch-optimi, compared with in the benchmark when present, pin torch: install
    # them with `pip install --no-deps timm torch-optimi`, never through these extras.
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis"], "bench": ["pytest-benchmark", "matplotlib"]},
)
