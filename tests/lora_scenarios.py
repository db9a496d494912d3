"""Random adapters laid out in scattered pool pages with kernel metadata, for kernel tests and benches.

Each adapter a has, for every key (a fused linear layer) k, per-slice ranks; its pages hold, per key,
A_cat [sum r, K] then Bt_j [r_j, width_j] per slice, in a random permutation of pool pages (so page
tables are exercised, never a contiguous view).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.lora import DESC_FIELDS
from kernels.lora_expand import ref_lora_expand
from kernels.lora_shrink import ref_lora_shrink


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


SPLITS = {
    "distinct": lambda t, a, g: [i % a for i in range(t)],
    "identical": lambda t, a, g: [0] * t,
    "zipf": lambda t, a, g: sorted(min(a - 1, int(v)) for v in torch.distributions.Pareto(1.0, 1.0).sample((t,)) - 1),
    "all-base": lambda t, a, g: [-1] * t,
    "mixed-with-base": lambda t, a, g: [(-1 if i % 3 == 0 else (i // 2) % a) for i in range(t)],
}
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def check_sgmv(shrink, expand, split, pool_dtype, act_dtype, device, T, K, widths, P, rank_choices, n_adapters, seed):
    """shrink/expand (Triton or CPU SGMV) equal their ref_ and the dense per-token oracle on one random case:
    adapters of random per-slice ranks in scattered pages, tokens split across them by `split`."""
    g = torch.Generator().manual_seed(seed)
    n_keys = 2
    ranks = [[[rank_choices[int(torch.randint(len(rank_choices), (1,), generator=g))] * int(torch.rand(1, generator=g) > 0.15)
               for _ in widths] for _ in range(n_keys)] for _ in range(n_adapters)]
    sc = build(ranks, K, widths, P, pool_dtype, device, g)
    slots = SPLITS[split](T, n_adapters, g)
    seg = [s.to(device) for s in segments(slots, empty_every=3)]
    col_starts = tuple(sum(widths[:j]) for j in range(len(widths)))
    N = sum(widths)
    max_len = max([int(v) for v in seg[1].tolist()] + [0])
    for key in range(n_keys):
        max_rank = max(sum(r[key]) for r in ranks)
        x = torch.randn(T, K, generator=g).to(act_dtype).to(device)
        y0 = torch.randn(T, N, generator=g).to(act_dtype).to(device)
        h = torch.zeros(T, max(max_rank, 1), device=device)
        h_ref = torch.zeros_like(h)
        shrink(h, x, sc.pool, sc.page_table, sc.pt_start, sc.desc, key, *seg, max_len, max_rank)
        ref_lora_shrink(h_ref, x, sc.pool, sc.page_table, sc.pt_start, sc.desc, key, *seg)
        rtol, atol = TOL[torch.float32] if act_dtype != torch.float16 else (1e-3, 1e-3)
        torch.testing.assert_close(h, h_ref, rtol=rtol, atol=atol)
        y, y_ref = y0.clone(), y0.clone()
        expand(y, h_ref, sc.pool, sc.page_table, sc.pt_start, sc.desc, key, col_starts, widths, *seg, max_len)
        ref_lora_expand(y_ref, h_ref, sc.pool, sc.page_table, sc.pt_start, sc.desc, key, col_starts, widths, *seg)
        rtol, atol = TOL[act_dtype]
        torch.testing.assert_close(y.float(), y_ref.float(), rtol=rtol, atol=atol * y_ref.float().abs().max().item())
        want = dense_lora(y0, x, sc, key, slots, col_starts)
        torch.testing.assert_close(y.float(), want, rtol=rtol, atol=atol * want.abs().max().item())
        base = torch.tensor([s < 0 for s in slots], device=device)
        assert torch.equal(y[base], y0[base]), "tokens without an adapter must be untouched"
