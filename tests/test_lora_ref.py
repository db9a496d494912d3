"""The ref_ semantics of batched LoRA against a per-token loop, on fresh random inputs, in every
split of tokens across adapters; page gathers equal the stored tensors (views when contiguous)."""
from __future__ import annotations

import pytest
import torch

from kernels.lora import ref_gather_rows, ref_lora_add, ref_scale_rows
from server.adapters.pool import PagePool, PoolFullError, page_size_for

SPLITS = {
    "distinct": lambda t, a: list(range(t)),
    "identical": lambda t, a: [0] * t,
    "zipf": lambda t, a: [min(a - 1, int(x)) for x in torch.distributions.Pareto(1.0, 1.2).sample((t,)) - 1],
    "all-base": lambda t, a: [-1] * t,
    "mixed-with-base": lambda t, a: [(-1 if i % 3 == 0 else i % a) for i in range(t)],
}


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_lora_add_matches_per_token_loop(split, dtype, tol):
    g = torch.Generator().manual_seed(hash(split) % 1000)
    t, n_in, n_out = 12, 48, 40
    ranks = [1, 4, 8, 16, 64, 3, 5, 2, 7, 9, 11, 13]
    n_ad = t
    slots = SPLITS[split](t, n_ad)
    x = torch.randn(t, n_in, generator=g).to(dtype)
    y0 = torch.randn(t, n_out, generator=g).to(dtype)
    ads = [(torch.randn(r, n_in, generator=g).to(dtype), torch.randn(r, n_out, generator=g).to(dtype), 0.5 + i)
           for i, r in enumerate(ranks[:n_ad])]
    y = y0.clone()
    for a in sorted(set(s for s in slots if s >= 0)):
        rows = torch.tensor([i for i, s in enumerate(slots) if s == a])
        A, Bt, scale = ads[a]
        ref_lora_add(y, x, A, Bt, scale, None if rows.numel() == t else rows)
    want = y0.float().clone()
    for i, s in enumerate(slots):
        if s >= 0:
            A, Bt, scale = ads[s]
            want[i] += scale * (x[i].float() @ A.float().t()) @ Bt.float()
    torch.testing.assert_close(y.float(), want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()) / 10)


def test_scale_rows():
    y = torch.randn(6, 5)
    g, b = torch.rand(5) + 0.5, torch.randn(5)
    rows = torch.tensor([1, 4])
    out = y.clone()
    ref_scale_rows(out, g, b, rows)
    want = y.clone()
    want[rows] = (y[rows] - b) * g + b
    torch.testing.assert_close(out, want)


def test_pool_pages_views_and_gathers():
    widths = [576, 192, 1536]
    p = page_size_for(widths)
    assert p == 192 and all(w % p == 0 for w in widths)
    pool = PagePool(48, p, torch.float32, torch.device("cpu"))
    a = torch.randn(4, 576)
    pages = pool.allocate(pool.pages_for(a.numel()))
    assert pages.tolist() == list(range(pages[0], pages[0] + 12))  # one contiguous run
    pool.write(pages, a)
    v = ref_gather_rows(pool.buffer, pages, 4, 576)
    assert v.data_ptr() == pool.buffer[pages[0]].data_ptr() and torch.equal(v, a)  # a view, not a copy
    # fragment the pool, then an allocation must take scattered pages and still read back exactly
    holes = [pool.allocate(3) for _ in range(12)]
    for h in holes[::2]:
        pool.free(h)
    b = torch.randn(16, 192)
    pb = pool.allocate(pool.pages_for(b.numel()))
    assert pb.numel() == 16 and not bool((pb[1:] - pb[:-1] == 1).all())
    pool.write(pb, b)
    assert torch.equal(ref_gather_rows(pool.buffer, pb, 16, 192), b)
    pool.free(pb)
    with pytest.raises(RuntimeError):
        pool.free(pb)  # double free


def test_pool_allocator_against_a_page_by_page_model():
    """Random allocations and frees checked against a bool-per-page model: page counts, no page handed
    out twice, a contiguous run whenever one is big enough (best fit), double frees refused, and the
    pool one free run again at the end."""
    import numpy as np

    rng = np.random.default_rng(0)
    pool = PagePool(500, 16, torch.float32, torch.device("cpu"))
    free = np.ones(500, dtype=bool)
    held = []
    for _ in range(400):
        if held and rng.random() < 0.45:
            pages = held.pop(int(rng.integers(len(held))))
            pool.free(pages)
            free[pages.numpy()] = True
            continue
        n = int(rng.integers(1, 60))
        if n > free.sum():
            with pytest.raises(PoolFullError):
                pool.allocate(n)
            continue
        runs = np.diff(np.concatenate(([0], free.astype(np.int8), [0])))
        longest = int((np.flatnonzero(runs == -1) - np.flatnonzero(runs == 1)).max())
        pages = pool.allocate(n)
        idx = pages.numpy()
        assert len(idx) == n and free[idx].all() and (np.diff(idx) > 0).all()
        if longest >= n:
            assert idx[-1] - idx[0] == n - 1, "a run that fits exists: the pages must be contiguous"
        free[idx] = False
        held.append(pages)
        assert pool.num_free == free.sum()
    if held:
        pool.free(held[0])
        with pytest.raises(RuntimeError, match="double free"):
            pool.free(held[0])
        for pages in held[1:]:
            pool.free(pages)
    assert pool.num_free == 500 and pool.allocate(500).tolist() == list(range(500))
