"""The paged adapter pool: one preallocated buffer of fixed-size pages on the device.

A page holds `page_size` elements, the greatest common divisor of every row width the model's
linear layers need (in and out features), so a LoRA row of any module fills whole pages and an
adapter takes pages in proportion to its ranks and target modules: no padding to a maximum rank.
Any free pages serve any adapter. An adapter gets one contiguous run when one fits (then its
tensors are plain views of the pool); otherwise it takes scattered pages and is read through its
page tables.

A pool may own its buffer outright (every page usable), or view a buffer it shares with the KV cache
(server/engine/memory.py): then it starts with no pages and uses only those granted to it (`grant`),
giving them back when they are free again (`revoke`). Page ids are then the memory budget's (block-major,
so a run of ids is a run of whole KV blocks) and `physical` maps them to rows of the buffer; page tables
and views are built from physical rows (layout.place).
"""
from __future__ import annotations

import bisect
import math
from functools import reduce
from typing import Callable

import numpy as np
import torch

from server import hugepages


class PoolFullError(Exception):
    pass


def page_size_for(widths: list[int], cap: int = 4096) -> int:
    p = reduce(math.gcd, widths)
    while p > cap:  # keep pages small enough for fine-grained allocation
        p = next(d for d in range(cap, 0, -1) if p % d == 0)
    return p


class PagePool:
    """Pages of one device buffer, handed out from a sorted list of free runs [start, length): allocation
    and freeing cost O(number of runs), not O(pages), so a pool of millions of pages stays cheap."""

    def __init__(self, num_pages: int, page_size: int, dtype: torch.dtype, device: torch.device,
                 shared: torch.Tensor | None = None, max_pages: int | None = None,
                 physical: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """shared: a contiguous buffer to view as [num_pages, page_size] pages of which none is usable until
        granted; max_pages: the most pages it may be granted (the --adapter-memory bound); physical: page ids
        -> buffer rows (default: the same)."""
        if num_pages < 1:
            raise ValueError(f"the adapter pool needs at least one page of {page_size} elements")
        self.page_size = page_size
        self.num_pages = num_pages  # addressable pages (page ids are below this)
        if shared is None:
            self.buffer = hugepages.zeros((num_pages, page_size), dtype, device, "adapter pool")  # [pages, page_size]
            self._runs: list[list[int]] = [[0, num_pages]]  # free runs, sorted, disjoint and never adjacent
            self.capacity = num_pages  # pages granted to the pool
        else:
            self.buffer = shared.view(-1).view(num_pages, page_size)
            self._runs, self.capacity = [], 0
        self.max_pages = min(num_pages, max_pages or num_pages)
        self._num_free = self.capacity
        self._physical = physical

    def map_pages(self, physical: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Set the page id -> buffer row map (before any page is granted)."""
        assert self.capacity == 0 or self._physical is not None
        self._physical = physical

    def physical(self, pages: torch.Tensor) -> torch.Tensor:
        """Buffer rows of page ids (int64)."""
        return pages if self._physical is None else self._physical(pages)

    @property
    def nbytes(self) -> int:
        """Bytes of the pages the pool holds now."""
        return self.capacity * self.page_size * self.buffer.element_size()

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        return self.capacity - self._num_free

    def pages_for(self, numel: int) -> int:
        return -(-numel // self.page_size)

    def allocate(self, n: int) -> torch.Tensor:
        """n page ids (int64, ascending): the best-fitting contiguous run, else pieces of the longest runs."""
        if n > self._num_free:
            raise PoolFullError(f"{n} pages needed, {self._num_free} free of {self.num_pages}")
        fits = [i for i, (_, length) in enumerate(self._runs) if length >= n]
        if fits:
            i = min(fits, key=lambda j: self._runs[j][1])
            chunks = [self._take(i, n)]
        else:
            chunks, left = [], n
            for start, length in sorted(self._runs, key=lambda r: -r[1]):  # stable: lower starts first
                take = min(left, length)
                chunks.append((start, take))
                left -= take
                if left == 0:
                    break
            for start, take in chunks:
                self._take(bisect.bisect_left(self._runs, [start, 0]), take)
        self._num_free -= n
        pages = np.sort(np.concatenate([np.arange(s, s + k) for s, k in chunks]))
        return torch.from_numpy(pages.astype(np.int64))

    def _take(self, i: int, k: int) -> tuple[int, int]:
        """The first k pages of free run i."""
        start, length = self._runs[i]
        if k == length:
            del self._runs[i]
        else:
            self._runs[i] = [start + k, length - k]
        return start, k

    def free(self, pages: torch.Tensor) -> None:
        idx = np.sort(pages.numpy())
        cuts = np.flatnonzero(np.diff(idx) != 1) + 1
        for run in np.split(idx, cuts):
            self._give_back(int(run[0]), len(run))
        self._num_free += len(idx)

    def _give_back(self, start: int, k: int) -> None:
        i = bisect.bisect_left(self._runs, [start, 0])
        prev = self._runs[i - 1] if i else None
        nxt = self._runs[i] if i < len(self._runs) else None
        if (prev and prev[0] + prev[1] > start) or (nxt and nxt[0] < start + k) or k < 1 or start < 0 \
                or start + k > self.num_pages:
            raise RuntimeError("double free of adapter pool pages")
        if prev and prev[0] + prev[1] == start:  # coalesce with the run before, then the one after
            prev[1] += k
            if nxt and nxt[0] == start + k:
                prev[1] += nxt[1]
                del self._runs[i]
        elif nxt and nxt[0] == start + k:
            nxt[0], nxt[1] = start, nxt[1] + k
        else:
            self._runs.insert(i, [start, k])

    def free_runs(self) -> list[tuple[int, int]]:
        """The free runs (start, length), ascending."""
        return [(s, n) for s, n in self._runs]

    def grant(self, pages: torch.Tensor) -> None:
        """Pages of a shared buffer become the pool's (free)."""
        self.capacity += pages.numel()
        self.free(pages)

    def revoke(self, pages: torch.Tensor) -> bool:
        """Give back granted pages, all of which must be free. -> False (nothing changes) if any is in use."""
        idx = np.sort(pages.numpy())
        runs = np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1)
        where = []
        for run in runs:
            start, k = int(run[0]), len(run)
            i = bisect.bisect_right(self._runs, [start, float("inf")]) - 1
            if i < 0 or self._runs[i][0] + self._runs[i][1] < start + k:
                return False
            where.append((start, k))
        for start, k in where:
            i = bisect.bisect_right(self._runs, [start, float("inf")]) - 1
            rs, rl = self._runs[i]
            pieces = [[rs, start - rs], [start + k, rs + rl - start - k]]
            self._runs[i:i + 1] = [r for r in pieces if r[1] > 0]
        self._num_free -= idx.size
        self.capacity -= idx.size
        return True

    def free_in(self, pages: torch.Tensor) -> int:
        """How many of these pages are free."""
        idx = pages.numpy()
        starts = np.array([r[0] for r in self._runs], dtype=np.int64)
        ends = starts + np.array([r[1] for r in self._runs], dtype=np.int64)
        i = np.searchsorted(starts, idx, side="right") - 1
        return int(((i >= 0) & (idx < ends[np.maximum(i, 0)])).sum()) if len(starts) else 0

    def write(self, pages: torch.Tensor, data: torch.Tensor) -> None:
        """Copy a tensor's elements into its pages (sized in whole pages): one copy when they are consecutive."""
        pages = self.physical(pages)
        flat = data.reshape(-1)
        first, n = int(pages[0]), pages.numel()
        if int(pages[-1]) - first == n - 1:
            self.buffer[first:first + n].view(-1).copy_(flat, non_blocking=True)
        else:
            self.buffer.index_copy_(0, pages.to(self.buffer.device),
                                    flat.view(-1, self.page_size).to(self.buffer.device, non_blocking=True))
