"""Paged decode attention: the C++ CPU kernel equals ref_paged_decode (and a dense per-sequence SDPA
oracle) on fresh random inputs: GQA, contexts of 1 token up to many blocks, partly filled last
blocks, scattered and shared blocks. Tolerance: fp32, 1e-5."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import paged_attention as pa

pytestmark = [pytest.mark.skipif(pa._ext() is None, reason="the C++ CPU kernels are not built (run ./setup.sh)"),
              pytest.mark.usefixtures("cpu_threads")]  # one thread, and the work split over two


def _case(lens, H=9, KVH=3, D=64, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(-(-n // bs) for n in lens)
    num_blocks = 4 * width * len(lens) + 2
    k = torch.randn(num_blocks * bs, KVH, D, generator=g)
    v = torch.randn(num_blocks * bs, KVH, D, generator=g)
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(lens), width, dtype=torch.int64)
    for b, n in enumerate(lens):
        nb = -(-n // bs)
        tables[b, :nb] = perm[b * width:b * width + nb]
    tables[-1, 0] = tables[0, 0]  # two sequences sharing a block (a shared prefix)
    q = torch.randn(len(lens), H, D, generator=g)
    return q, k, v, tables, torch.tensor(lens, dtype=torch.int32), bs


@pytest.mark.parametrize("lens", [[1], [16], [17, 1, 300, 33], [5] * 32 + [129]])
def test_cpu_paged_decode_equals_reference_and_dense_oracle(lens):
    q, k, v, tables, lens_t, bs = _case(lens, seed=len(lens))
    got = pa.paged_decode(q, k, v, tables, lens_t, bs, 0.125)
    torch.testing.assert_close(got, pa.ref_paged_decode(q, k, v, tables, lens_t, bs, 0.125), rtol=1e-5, atol=1e-5)
    for b, n in enumerate(lens):
        slots = (tables[b][:, None] * bs + torch.arange(bs)).flatten()[:n]
        kb, vb = k[slots].transpose(0, 1), v[slots].transpose(0, 1)  # [KVH, n, D]
        want = F.scaled_dot_product_attention(q[b][:, None], kb.repeat_interleave(3, 0), vb.repeat_interleave(3, 0),
                                              scale=0.125)[:, 0]
        torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("H,KVH,D", [(8, 2, 128), (5, 1, 64), (4, 4, 64), (12, 2, 128), (6, 3, 32)])
@pytest.mark.parametrize("peak", [1.0, 12.0])
def test_cpu_paged_decode_head_layouts(H, KVH, D, peak):
    """Every query-head grouping (1..6 per KV head), head sizes of the vectorized (64, 128) and generic
    (32) paths; peak=12 makes the softmax nearly one-hot (score gaps of tens)."""
    q, k, v, tables, lens_t, bs = _case([1, 15, 16, 17, 70], H=H, KVH=KVH, D=D, seed=H * D)
    q = q * peak
    got = pa.paged_decode(q, k, v, tables, lens_t, bs, D ** -0.5)
    torch.testing.assert_close(got, pa.ref_paged_decode(q, k, v, tables, lens_t, bs, D ** -0.5), rtol=1e-5, atol=1e-5)


def test_cpu_paged_decode_rejects_tables_outside_the_cache():
    q, k, v, tables, lens, bs = _case([20, 3])
    bad = tables.clone()
    bad[0, 1] = k.shape[0] // bs  # one block past the end
    with pytest.raises(RuntimeError, match="outside the cache"):
        pa.paged_decode(q, k, v, bad, lens, bs, 0.125)
    with pytest.raises(RuntimeError, match="context length"):
        pa.paged_decode(q, k, v, tables, torch.tensor([20, 40], dtype=torch.int32), bs, 0.125)


def _prefill_case(specs, H=9, KVH=3, D=64, bs=16, seed=0):
    """specs: (cached, n) per chunk -> q [T, H, D], caches, chunk list for pack_prefill_chunks."""
    g = torch.Generator().manual_seed(seed)
    total = sum(c + n for c, n in specs)
    num_slots = 2 * total + bs
    k = torch.randn(num_slots, KVH, D, generator=g)
    v = torch.randn(num_slots, KVH, D, generator=g)
    perm = torch.randperm(num_slots, generator=g)  # scattered slots, no two contexts share one
    T = sum(n for _, n in specs) + 3  # 3 rows that are not prefill queries (decode tokens) stay untouched
    q = torch.randn(T, H, D, generator=g)
    chunks, at, used = [], 3, 0
    for cached, n in specs:
        chunks.append((at, n, cached + n, perm[used:used + cached + n].clone()))
        at += n
        used += cached + n
    return q, k, v, chunks


@pytest.mark.parametrize("H,KVH,D", [(9, 3, 64), (8, 2, 128), (6, 3, 32)])
def test_cpu_paged_prefill_equals_reference_and_causal_oracle(H, KVH, D):
    """Chunks of 1 to 70 queries, with and without a cached prefix (chunked prefill, prefix-cache hits),
    head sizes of the vectorized and the generic path; rows outside the chunks are left alone."""
    specs = [(0, 1), (0, 17), (5, 1), (33, 40), (0, 70), (16, 16)]
    q, k, v, chunks = _prefill_case(specs, H=H, KVH=KVH, D=D, seed=H + D)
    packed = pa.pack_prefill_chunks(chunks)
    got = pa.paged_prefill(q, k, v, *packed, D ** -0.5, torch.full_like(q, 7.0))
    want = pa.ref_paged_prefill(q, k, v, *packed, D ** -0.5, torch.full_like(q, 7.0))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.all(got[:3] == 7.0)
    for (q0, n, ctx, slots), (cached, _) in zip(chunks, specs):  # oracle: one causal SDPA per chunk's full context
        kc = k[slots].transpose(0, 1).repeat_interleave(H // KVH, 0)
        vc = v[slots].transpose(0, 1).repeat_interleave(H // KVH, 0)
        qf = torch.cat([torch.zeros(cached, H, D), q[q0:q0 + n]]).transpose(0, 1)  # queries at positions 0 .. ctx
        o = F.scaled_dot_product_attention(qf, kc, vc, is_causal=True, scale=D ** -0.5)[:, cached:]
        torch.testing.assert_close(got[q0:q0 + n], o.transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_cpu_paged_prefill_rejects_bad_chunks():
    q, k, v, chunks = _prefill_case([(0, 4)])
    ch, slots = pa.pack_prefill_chunks(chunks)
    out = torch.empty_like(q)
    bad = slots.clone()
    bad[2] = k.shape[0]
    with pytest.raises(RuntimeError, match="outside the cache"):
        pa.paged_prefill(q, k, v, ch, bad, 0.125, out)
    for row in ([3, 4, 0, 3], [3, 4, 1, 4], [q.shape[0] - 2, 4, 0, 4]):  # n > ctx, slots past the end, rows past T
        with pytest.raises(RuntimeError, match="outside the step"):
            pa.paged_prefill(q, k, v, torch.tensor([row]), slots, 0.125, out)
