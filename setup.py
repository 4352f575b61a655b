"""Packaging for lookahead_fused (pure Python for now; the compiled core adds a CMake build)."""

from setuptools import find_packages, setup

setup(
    name="lookahead_fused",
    version="0.1.0",
    description="Lookahead fused with SGD/Adam/AdamW: one pass per parameter bucket per step",
    packages=find_packages(include=["lookahead_fused", "lookahead_fused.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis"]},
)
