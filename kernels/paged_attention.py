"""Attention over the paged KV cache: decode (one query token per sequence, its context read through
the sequence's block table) and prefill (the causal queries of a step's prefill chunks).

Semantics (ref_paged_decode): for sequence b with context length L_b = lens[b], slot(t) =
block_tables[b, t // block_size] * block_size + t % block_size, and query head h reading KV head
h // (H / KVH) (GQA):
    out[b, h] = softmax_t(scale * q[b, h] . k_cache[slot(t), kv(h)]) @ v_cache[slot(t), kv(h)],  t < L_b
Prefill (ref_paged_prefill): chunk c holds queries q[q_start : q_start + n] of a sequence whose context
(cached prefix + the chunk, ctx_len tokens) sits in cache slots slots[slot_off : slot_off + ctx_len]; its
query i sees context tokens 0 .. ctx_len - n + i (causal, after the cached prefix).
`paged_decode` / `paged_prefill` are the fastest paths for the tensors: the C++ kernels
(kernels/cpu/paged_attention.cpp) for fp32 on the CPU, which read keys and values in place, else the
references (contexts gathered, then SDPA).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import cpu_ext


def ref_paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     lens: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """q [B, H, D]; caches [slots, KVH, D]; block_tables int64 [B, W]; lens int [B] -> [B, H, D]."""
    b, width = block_tables.shape
    kvh = k_cache.shape[1]
    flat = block_tables.flatten()
    kb = k_cache.view(-1, block_size, *k_cache.shape[1:]).index_select(0, flat)
    vb = v_cache.view(-1, block_size, *v_cache.shape[1:]).index_select(0, flat)
    kb = kb.view(b, width * block_size, *k_cache.shape[1:]).transpose(1, 2)  # [B, KVH, L, D]
    vb = vb.view(b, width * block_size, *v_cache.shape[1:]).transpose(1, 2)
    mask = (torch.arange(width * block_size, device=q.device)[None, :] < lens.to(q.device)[:, None])[:, None, None, :]
    o = F.scaled_dot_product_attention(q.unsqueeze(2), kb, vb, attn_mask=mask, scale=scale,
                                       enable_gqa=kvh != q.shape[1])
    return o.squeeze(2)


def _ext():
    return cpu_ext.load("paged_attention", "paged decode attention")


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 lens: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """ref_paged_decode's result, through the C++ kernel when it takes these tensors."""
    if q.device.type == "cpu" and q.dtype == torch.float32 == k_cache.dtype and _ext() is not None:
        return _ext().paged_decode(q.contiguous(), k_cache, v_cache, block_tables, lens.to(torch.int32), block_size,
                                   scale)
    return ref_paged_decode(q, k_cache, v_cache, block_tables, lens, block_size, scale)


def pack_prefill_chunks(chunks: list[tuple[int, int, int, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(q_start, n, ctx_len, slots [ctx_len] int64)] -> (chunks int64 [C, 4] (q_start, n, slot_off, ctx_len),
    slots int64 [sum ctx_len]): the layout `paged_prefill` takes, built once per step."""
    rows, off = [], 0
    for q_start, n, ctx, _ in chunks:
        rows.append((q_start, n, off, ctx))
        off += ctx
    return torch.tensor(rows, dtype=torch.int64), torch.cat([s.to(torch.int64) for *_, s in chunks])


def ref_paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, chunks: torch.Tensor,
                      slots: torch.Tensor, scale: float, out: torch.Tensor) -> torch.Tensor:
    """q/out [T, H, D]; caches [slots, KVH, D]; chunks int64 [C, 4]; slots int64 [S]: writes the chunks' rows of out."""
    kvh = k_cache.shape[1]
    for q0, n, so, ctx in chunks.tolist():
        qc = q[q0:q0 + n].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        s = slots[so:so + ctx].to(k_cache.device)
        kc = k_cache[s].transpose(0, 1).unsqueeze(0)  # [1, KVH, ctx, D]
        vc = v_cache[s].transpose(0, 1).unsqueeze(0)
        mask = None if ctx == n else (  # no cached prefix: plain causal (SDPA's fused kernels take it)
            torch.arange(ctx, device=q.device)[None, :] <= (ctx - n + torch.arange(n, device=q.device))[:, None])
        o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, is_causal=mask is None, scale=scale,
                                           enable_gqa=kvh != q.shape[1])
        out[q0:q0 + n] = o[0].transpose(0, 1)
    return out


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, chunks: torch.Tensor,
                  slots: torch.Tensor, scale: float, out: torch.Tensor) -> torch.Tensor:
    """ref_paged_prefill's result (into out), through the C++ kernel when it takes these tensors."""
    if q.device.type == "cpu" and q.dtype == torch.float32 == k_cache.dtype and out.is_contiguous() \
            and _ext() is not None:
        _ext().paged_prefill(q.contiguous(), k_cache, v_cache, chunks, slots, scale, out)
        return out
    return ref_paged_prefill(q, k_cache, v_cache, chunks, slots, scale, out)
