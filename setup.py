"""Builds the C++ CPU kernels (kernels/cpu/*.cpp) at install time; metadata lives in pyproject.toml.

One extension module per source, kernels/_cpu_<name> from kernels/cpu/<name>.cpp (cpu_ext.KERNELS
lists the names), imported by kernels.cpu_ext.load. They build against the torch already installed,
so install with `pip install --no-build-isolation` (setup.sh and the Dockerfile do): an isolated
build env would resolve its own torch, a multi-GB CUDA build.

The code is compiled for one CPU: TESSERA_CPU_ARCH (default `native`, the build machine's own
instruction set, AVX-512 included where it has it) is passed as -march. An image or wheel meant for
other machines sets a portable level such as `x86-64-v3` (AVX2, no AVX-512 paths).
"""
from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as exc:  # an isolated build env, or torch not installed yet
    raise SystemExit("Tessera's CPU kernels build against the installed torch: install torch first "
                     "(setup.sh does), then `pip install --no-build-isolation ...`") from exc

ROOT = Path(__file__).resolve().parent
ARCH = os.environ.get("TESSERA_CPU_ARCH", "native")


class BuildKernels(BuildExtension):
    """An editable install keeps its objects in build/cpu-kernels, so rerunning it (setup.sh) recompiles
    only what changed: ninja tracks sources, included headers and flags. setuptools would otherwise
    compile every kernel from scratch in a fresh temp dir (minutes) each time."""

    def finalize_options(self):
        super().finalize_options()
        if self.editable_mode:
            self.build_temp = str(ROOT / "build" / "cpu-kernels")

    def copy_file(self, infile, outfile, *args, **kwargs):
        # The in-place copy is a new file, never the old one truncated and rewritten: processes still
        # running have the old module mapped (a rewrite under them is a SIGBUS).
        if os.path.exists(outfile):
            os.unlink(outfile)
        return super().copy_file(infile, outfile, *args, **kwargs)


# -g0: Python's own CFLAGS carry -g, which makes each module ~11 MB instead of ~0.3 MB
ext_modules = [
    CppExtension(f"kernels._cpu_{src.stem}", [f"kernels/cpu/{src.name}"],
                 depends=[f"kernels/cpu/{h.name}" for h in sorted(src.parent.glob("*.h"))],
                 extra_compile_args=["-O3", f"-march={ARCH}", "-fopenmp", "-g0"], extra_link_args=["-fopenmp"])
    for src in sorted((ROOT / "kernels" / "cpu").glob("*.cpp"))
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildKernels})
