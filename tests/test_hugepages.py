"""The KV cache and the adapter pool ask for transparent huge pages where Linux offers them
(server/hugepages.py): checked in /proc/self/smaps, the kernel's own account of this process's memory. The
request is checked (the mapping's `hg` flag, MADV_HUGEPAGE), not its fulfilment: whether 2 MB pages are
free to back it depends on the machine's memory at that moment (a fresh-clone CI run got none).

The control is a fresh mmap, not a plain torch.zeros: glibc serves even a 96 MiB request from freed heap
memory when a large enough free chunk is there, and heap memory an earlier huge-page buffer advised keeps
its flag (a CI worker's plain torch.zeros came back `hg` after earlier tests)."""
from __future__ import annotations

import ctypes
import mmap
import sys

import pytest
import torch

from server import hugepages
from server.adapters.pool import PagePool

needs_thp = pytest.mark.skipif(not sys.platform.startswith("linux") or hugepages.thp_mode() not in ("always", "madvise"),
                               reason="no transparent huge pages on this system")


def vm_flags(t: torch.Tensor | mmap.mmap) -> list[str]:
    """The VmFlags of the mapping holding the first 2 MB boundary inside t's memory."""
    start = ctypes.addressof(ctypes.c_char.from_buffer(t)) if isinstance(t, mmap.mmap) else t.data_ptr()
    addr = -(-start // hugepages.HUGE) * hugepages.HUGE
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError("no mapping holds the buffer")


def test_zeros_are_zeros_of_the_shape_and_dtype():
    for dtype in (torch.float32, torch.bfloat16):
        t = hugepages.zeros((3, 5 << 20), dtype, "cpu")
        assert t.shape == (3, 5 << 20) and t.dtype == dtype and t.is_contiguous()
        assert not t.any()
    assert hugepages.zeros((4,), torch.float32, "cpu").tolist() == [0.0] * 4  # small: plain zeros


@needs_thp
def test_large_buffers_ask_for_huge_pages():
    t = hugepages.zeros((48 << 20,), torch.bfloat16, "cpu")  # 96 MiB
    assert "hg" in vm_flags(t)
    fresh = mmap.mmap(-1, 96 << 20)  # anonymous memory nobody advised
    try:
        assert "hg" not in vm_flags(fresh)
    finally:
        fresh.close()


@needs_thp
def test_the_adapter_pool_buffer_asks_for_huge_pages():
    pool = PagePool(num_pages=(64 << 20) // (192 * 2), page_size=192, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert pool.buffer.shape == ((64 << 20) // 384, 192) and not pool.buffer.any()
    assert "hg" in vm_flags(pool.buffer)
