"""The project's C++ CPU kernels (kernels/cpu/*.cpp), each built on first use with torch's cpp_extension.

Builds are cached by torch (~/.cache/torch_extensions) and happen once per machine. Without a
compiler or headers `load` returns None and callers use their plain-torch path, with a warning.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

log = logging.getLogger("tessera.kernels")


def _headers_hash() -> str:
    """The shared headers (kernels/cpu/*.h) as a build flag: torch's cache keys on sources and flags only."""
    h = hashlib.sha256()
    for header in sorted((Path(__file__).resolve().parent / "cpu").glob("*.h")):
        h.update(header.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def load(source: str, what: str):
    """kernels/cpu/<source>.cpp as a Python module, or None. `what` names the kernels in the logs."""
    try:
        from torch.utils.cpp_extension import load as build

        src = Path(__file__).resolve().parent / "cpu" / f"{source}.cpp"
        log.info("building the CPU %s kernels (first use only; cached by torch's cpp_extension)", what)
        return build(name=f"tessera_{source}", sources=[str(src)], verbose=False, extra_ldflags=["-fopenmp"],
                     extra_cflags=["-O3", "-march=native", "-fopenmp", f"-DTESSERA_HEADERS={_headers_hash()}"])
    except Exception as exc:  # no compiler, no headers: fall back, loudly
        log.warning("CPU %s kernels unavailable (%s); using the slower reference path", what, exc)
        return None
