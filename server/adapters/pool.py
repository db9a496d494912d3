"""The paged adapter pool: one preallocated buffer of fixed-size pages on the device.

A page holds `page_size` elements, the greatest common divisor of every row width the model's
linear layers need (in and out features), so a LoRA row of any module fills whole pages and an
adapter takes pages in proportion to its ranks and target modules: no padding to a maximum rank.
Any free pages serve any adapter. An adapter gets one contiguous run when one fits (then its
tensors are plain views of the pool); otherwise it takes scattered pages and is read through its
page tables.
"""
from __future__ import annotations

import math
from functools import reduce

import numpy as np
import torch


class PoolFullError(Exception):
    pass


def page_size_for(widths: list[int], cap: int = 4096) -> int:
    p = reduce(math.gcd, widths)
    while p > cap:  # keep pages small enough for fine-grained allocation
        p = next(d for d in range(cap, 0, -1) if p % d == 0)
    return p


class PagePool:
    def __init__(self, num_pages: int, page_size: int, dtype: torch.dtype, device: torch.device):
        if num_pages < 1:
            raise ValueError(f"the adapter pool needs at least one page of {page_size} elements")
        self.page_size = page_size
        self.num_pages = num_pages
        self.buffer = torch.zeros(num_pages, page_size, dtype=dtype, device=device)  # [pages, page_size]
        self._free = np.ones(num_pages, dtype=bool)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    @property
    def num_free(self) -> int:
        return int(self._free.sum())

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    def pages_for(self, numel: int) -> int:
        return -(-numel // self.page_size)

    def allocate(self, n: int) -> torch.Tensor:
        """n page ids (int64, ascending runs): the best-fitting contiguous run, else the longest runs."""
        if n > self.num_free:
            raise PoolFullError(f"{n} pages needed, {self.num_free} free of {self.num_pages}")
        edges = np.diff(np.concatenate(([0], self._free.astype(np.int8), [0])))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        lens = ends - starts
        fits = np.flatnonzero(lens >= n)
        if fits.size:
            i = fits[np.argmin(lens[fits])]
            pages = np.arange(starts[i], starts[i] + n)
        else:
            chunks, left = [], n
            for i in np.argsort(-lens, kind="stable"):
                take = min(left, lens[i])
                chunks.append(np.arange(starts[i], starts[i] + take))
                left -= take
                if left == 0:
                    break
            pages = np.sort(np.concatenate(chunks))
        self._free[pages] = False
        return torch.from_numpy(pages.astype(np.int64))

    def free(self, pages: torch.Tensor) -> None:
        idx = pages.numpy()
        if (self._free[idx]).any():
            raise RuntimeError("double free of adapter pool pages")
        self._free[idx] = True

    def write(self, pages: torch.Tensor, data: torch.Tensor) -> None:
        """Copy a tensor's elements into its pages (sized in whole pages): one copy when they are consecutive."""
        flat = data.reshape(-1)
        first, n = int(pages[0]), pages.numel()
        if int(pages[-1]) - first == n - 1:
            self.buffer[first:first + n].view(-1).copy_(flat, non_blocking=True)
        else:
            self.buffer.index_copy_(0, pages.to(self.buffer.device),
                                    flat.view(-1, self.page_size).to(self.buffer.device, non_blocking=True))
