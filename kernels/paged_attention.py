"""Decode attention over the paged KV cache: one query token per sequence, its context read through
the sequence's block table.

Semantics (ref_paged_decode): for sequence b with context length L_b = lens[b], slot(t) =
block_tables[b, t // block_size] * block_size + t % block_size, and query head h reading KV head
h // (H / KVH) (GQA):
    out[b, h] = softmax_t(scale * q[b, h] . k_cache[slot(t), kv(h)]) @ v_cache[slot(t), kv(h)],  t < L_b
`paged_decode` is the fastest path for the tensors: the C++ kernel (kernels/cpu/paged_attention.cpp)
for fp32 on the CPU, which reads keys and values in place, else the reference (whole blocks gathered
and padded to the longest context, then one masked SDPA).
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
