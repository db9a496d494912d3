"""Large host buffers (the KV cache, the adapter pool) backed by transparent huge pages on Linux.

A decode step in S-LoRA's setting reads each of dozens of adapters' pages once, from anywhere in a pool of
a gigabyte or more: with 4 KB pages nearly every few pages cost a TLB miss and a page walk. 2 MB pages
cover the pool with a few hundred TLB entries (bench/bench_lora_cpu.py: 32 distinct adapters in 12 KB runs
over a 1.5 GiB pool, see bench/RESULTS.md). Linux backs a region with huge pages when asked
(madvise MADV_HUGEPAGE, or THP "always"); the request is made before the first touch, so the pages are
faulted in huge. Elsewhere (another OS, THP "never", a GPU buffer) this is plain torch.zeros.
"""
from __future__ import annotations

import ctypes
import logging
import sys
from pathlib import Path

import torch

log = logging.getLogger("tessera.engine")

HUGE = 2 << 20  # x86-64 / arm64 transparent huge page
MADV_HUGEPAGE = 14
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or "" where there is none."""
    try:
        text = THP_MODE.read_text()
    except OSError:
        return ""
    return text[text.index("[") + 1:text.index("]")] if "[" in text else ""


def _madvise_huge(t: torch.Tensor) -> bool:
    """Ask for huge pages over the 2 MB-aligned interior of t's memory (untouched yet) -> whether it was taken."""
    start, nbytes = t.data_ptr(), t.numel() * t.element_size()
    lo, hi = -(-start // HUGE) * HUGE, (start + nbytes) // HUGE * HUGE
    if hi <= lo:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


def zeros(shape, dtype: torch.dtype, device: torch.device | str, what: str = "buffer") -> torch.Tensor:
    """torch.zeros(shape) whose host memory, when large, is backed by huge pages where Linux offers them."""
    device = torch.device(device)
    if device.type != "cpu" or not sys.platform.startswith("linux") or thp_mode() not in ("always", "madvise"):
        return torch.zeros(shape, dtype=dtype, device=device)
    t = torch.empty(shape, dtype=dtype)
    if t.numel() * t.element_size() >= 4 * HUGE:
        if _madvise_huge(t):
            log.debug("%s: %.1f MiB in huge pages", what, t.numel() * t.element_size() / 2**20)
    return t.zero_()  # the first touch: pages are faulted in now, huge where asked
