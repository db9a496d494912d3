"""The project's C++ CPU kernels (kernels/cpu/<name>.cpp), prebuilt at install time as kernels._cpu_<name>.

setup.py compiles them when the package is installed (`pip install --no-build-isolation -e .`, which
setup.sh runs; rerun it after editing kernels/cpu/). Nothing is compiled at run time: a module that
is missing or does not import (a source checkout never installed, torch upgraded since the build)
makes `load` return None with a warning, and its callers run their plain-torch reference instead.
"""
from __future__ import annotations

import functools
import importlib
import logging
from pathlib import Path

import torch  # noqa: F401  (loads libtorch and libc10, which the modules link against)

log = logging.getLogger("tessera.kernels")

KERNELS = ("lora_sgmv", "quant_gemm", "paged_attention", "layer_ops")  # setup.py builds kernels/cpu/<name>.cpp
_SOURCES = Path(__file__).resolve().parent / "cpu"


@functools.lru_cache(maxsize=None)
def _import(name: str) -> tuple[object | None, str]:
    """(module, "compiled") or (None, "fallback: <reason>"); imported once per process."""
    try:
        module = importlib.import_module(f"kernels._cpu_{name}")
    except ImportError as exc:
        reason = ("not built (install the package: ./setup.sh or pip install --no-build-isolation -e .)"
                  if isinstance(exc, ModuleNotFoundError) and exc.name == f"kernels._cpu_{name}" else str(exc))
        return None, f"fallback: {reason}"
    _warn_if_stale(name, Path(module.__file__))
    return module, "compiled"


def _warn_if_stale(name: str, built: Path) -> None:
    """In a source tree, a kernel edited after the build still runs the old code until a reinstall."""
    newer = [p.name for p in (_SOURCES / f"{name}.cpp", *_SOURCES.glob("*.h"))
             if p.exists() and p.stat().st_mtime > built.stat().st_mtime]
    if newer:
        log.warning("CPU kernel %s was built before the last change to %s: it runs the old code until "
                    "./setup.sh (pip install --no-build-isolation -e .) rebuilds it", name, ", ".join(newer))


def load(source: str, what: str):
    """The prebuilt kernels/cpu/<source>.cpp module, or None. `what` names the kernels in the warning."""
    module, state = _import(source)
    if module is None:
        _warn_fallback(source, what, state)
    return module


@functools.lru_cache(maxsize=None)
def _warn_fallback(source: str, what: str, state: str) -> None:
    log.warning("CPU %s kernels (%s) unavailable, using the slower plain-torch path: %s", what, source,
                state.removeprefix("fallback: "))


def status() -> dict[str, str]:
    """Each CPU kernel -> "compiled" or "fallback: <reason>"."""
    return {name: _import(name)[1] for name in KERNELS}


def log_status() -> None:
    """One startup line: which CPU kernels are compiled; a warning naming each one that falls back."""
    states = status()
    compiled = [name for name, state in states.items() if state == "compiled"]
    fallbacks = {name: state for name, state in states.items() if state != "compiled"}
    if fallbacks:
        log.warning("CPU kernels compiled: %s; plain-torch fallback (slower) for %s", ", ".join(compiled) or "none",
                    "; ".join(f"{name}: {state.removeprefix('fallback: ')}" for name, state in fallbacks.items()))
    else:
        log.info("CPU kernels compiled: %s", ", ".join(compiled))
