"""The package build compiles the CPU kernels (plain C, the system C compiler, no torch headers)
into `vqfunc/_kernels/prebuilt/`, so a wheel carries them and `pip install .` / `pip install -e .`
compile them at install time when a compiler is there. Without one the build goes on, and the
kernels are built on first use instead (see vqfunc/_kernels/cpu.py)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent
KERNELS = ROOT / "vqfunc" / "_kernels"


def _build_spec():  # type: ignore[no-untyped-def]
    # Loaded by path: importing vqfunc would import torch, which the build does not need.
    spec = importlib.util.spec_from_file_location("_vqfunc_kernel_build", KERNELS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithKernels(build_py):
    def run(self) -> None:
        super().run()
        spec = _build_spec()
        if getattr(self, "editable_mode", False):
            target = KERNELS / spec.PREBUILT_DIR  # an editable install imports the source tree
        else:
            target = Path(self.build_lib) / "vqfunc" / "_kernels" / spec.PREBUILT_DIR
        print(f"vqfunc: {spec.build_prebuilt(target, os.environ.get('CC'))}")


class PlatformWheel(bdist_wheel):
    """A platform wheel (it carries a compiled library), for any Python 3: no Python ABI."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.root_is_pure = False

    def get_tag(self) -> tuple[str, str, str]:
        _, _, platform = super().get_tag()
        return "py3", "none", platform


class KernelDistribution(Distribution):
    def has_ext_modules(self) -> bool:
        return True


setup(
    cmdclass={"build_py": BuildPyWithKernels, "bdist_wheel": PlatformWheel},
    distclass=KernelDistribution,
)
