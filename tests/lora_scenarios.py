"""Random adapters laid out in scattered pool pages with kernel metadata, for kernel tests and benches.

Each adapter a has, for every key (a fused linear layer) k, per-slice ranks; its pages hold, per key,
A_cat [sum r, K] then Bt_j [r_j, width_j] per slice, in a random permutation of pool pages (so page
tables are exercised, never a contiguous view).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.lora import DESC_FIELDS


@dataclass
class Scenario:
    pool: torch.Tensor  # [pages, P]
    page_table: torch.Tensor  # int32
    pt_start: torch.Tensor  # int32 [A]
    desc: torch.Tensor  # int32 [A, keys, DESC_FIELDS]
    dense: list[list[tuple[torch.Tensor, list[torch.Tensor]]]]  # [adapter][key] -> (A_cat, [Bt_j])
    ranks: list[list[list[int]]]  # [adapter][key][slice]


def build(ranks: list[list[list[int]]], K: int, widths: tuple[int, ...], P: int, dtype: torch.dtype,
          device: str | torch.device = "cpu", gen: torch.Generator | None = None) -> Scenario:
    gen = gen or torch.Generator().manual_seed(0)
    n_keys = len(ranks[0])
    per_adapter, dense, descs = [], [], []
    for ad in ranks:
        flat, keys, desc, at = [], [], torch.zeros(n_keys, DESC_FIELDS, dtype=torch.int32), 0
        for k, rs in enumerate(ad):
            R = sum(rs)
            A = torch.randn(R, K, generator=gen) / K ** 0.5
            Bts = [torch.randn(r, w, generator=gen) for r, w in zip(rs, widths)]
            keys.append((A.to(dtype), [b.to(dtype) for b in Bts]))
            desc[k, 0], desc[k, 1] = (at if R else 0), R
            flat.append(A.reshape(-1))
            at += A.numel() // P
            r0 = 0
            for j, (r, b) in enumerate(zip(rs, Bts)):
                if r:
                    desc[k, 2 + 3 * j: 5 + 3 * j] = torch.tensor([at, r0, r0 + r])
                flat.append(b.reshape(-1))
                at += b.numel() // P
                r0 += r
        per_adapter.append(torch.cat(flat).to(dtype))
        dense.append(keys)
        descs.append(desc)
    total = sum(f.numel() // P for f in per_adapter)
    num_pages = total + 3
    perm = torch.randperm(num_pages, generator=gen)
    pool = torch.full((num_pages, P), float("nan"), dtype=dtype)  # unused pages poison any stray read
    tables, at = [], 0
    for f in per_adapter:
        n = f.numel() // P
        pages = perm[at:at + n]
        at += n
        pool[pages] = f.view(n, P)
        tables.append(pages)
    lens = torch.tensor([0] + [t.numel() for t in tables])
    return Scenario(pool.to(device), torch.cat(tables).to(torch.int32).to(device),
                    lens.cumsum(0)[:-1].to(torch.int32).to(device), torch.stack(descs).to(device), dense, ranks)


def segments(slots: list[int], empty_every: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token slots (-1 = base) -> (seg_start, seg_len, seg_slot) int32: one segment per run of a slot,
    with an empty segment inserted every `empty_every` runs when asked."""
    starts, lens, ss = [], [], []
    i = 0
    while i < len(slots):
        j = i
        while j < len(slots) and slots[j] == slots[i]:
            j += 1
        if slots[i] >= 0:
            starts.append(i), lens.append(j - i), ss.append(slots[i])
            if empty_every and len(starts) % empty_every == 0:
                starts.append(j), lens.append(0), ss.append(slots[i])
        i = j
    mk = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    return mk(starts), mk(lens), mk(ss)


def dense_lora(y: torch.Tensor, x: torch.Tensor, sc: Scenario, key: int, slots: list[int],
               col_starts: tuple[int, ...]) -> torch.Tensor:
    """The oracle from the dense tensors, one token at a time in fp32."""
    out = y.float().clone()
    for t, a in enumerate(slots):
        if a < 0:
            continue
        A, Bts = sc.dense[a][key]
        if A.shape[0] == 0:
            continue
        h = x[t].float() @ A.float().t()
        r0 = 0
        for j, b in enumerate(Bts):
            r = b.shape[0]
            if r:
                out[t, col_starts[j]:col_starts[j] + b.shape[1]] += h[r0:r0 + r] @ b.float()
            r0 += r
    return out
