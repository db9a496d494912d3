"""Attention over the paged KV cache (kernels/paged_attention.py: decode tokens, and the causal queries of
prefill chunks), and cache-free attention over padded batches for training (`DenseAttention`).

The step's tokens are laid out as [decode tokens (one per sequence) | prefill chunk 0 | chunk 1 ...].
New keys/values are written into their cache slots first, then each query attends to its
sequence's whole context read back through the block table.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch
import torch.nn.functional as F

from kernels.paged_attention import pack_prefill_chunks, paged_decode, paged_prefill


@dataclass
class PrefillChunk:
    """Query i of the chunk sees context tokens 0 .. context_len - length + i (causal after the cached prefix)."""

    start: int  # offset of the chunk's first token in the step's token list
    length: int  # tokens in this chunk
    context_len: int  # tokens of the sequence in the cache after this chunk (cached prefix + chunk)
    slots: torch.Tensor  # [context_len] int64 cache slots of the whole context, in order


@dataclass
class AttentionMetadata:
    """Built once per step by the model runner, read by every layer."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot where each new token's K/V goes
    num_decodes: int  # the first num_decodes tokens are single-token steps of distinct sequences
    decode_block_tables: torch.Tensor | None  # [B, max_blocks] int64 (padded with block 0)
    decode_lens: torch.Tensor | None  # [B] int32: context length of each decode sequence (this token included)
    prefills: list[PrefillChunk]

    @cached_property
    def prefill_pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefill chunks as `paged_prefill` takes them, packed on first use and shared by all layers."""
        chunks, slots = pack_prefill_chunks([(c.start, c.length, c.context_len, c.slots) for c in self.prefills])
        return chunks.to(self.slot_mapping.device), slots.to(self.slot_mapping.device)


@dataclass
class DenseAttention:
    """Cache-free attention over a padded batch (training and the trainer's evaluation).

    The step's T = B * S tokens are B right-padded sequences of S; `lengths` [B] real tokens each.
    `prefix_kv(layer)` gives a layer's shared prefix (prefix tuning) as (k, v) [B or 1, KVH, P, D]:
    every real token attends to all P prefix positions, then causally to its own sequence.
    """

    batch: int
    seq_len: int
    mask: torch.Tensor  # [B, 1, S, P + S] bool (True = attend)
    prefix_kv: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None

    @staticmethod
    def build(lengths: torch.Tensor, seq_len: int, prefix_len: int = 0, prefix_kv=None) -> "DenseAttention":
        lengths = lengths.to(torch.long)
        b = lengths.numel()
        dev = lengths.device
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=dev).tril()
        real = torch.arange(seq_len, device=dev)[None, :] < lengths[:, None]  # [B, S] keys
        own = causal[None] & real[:, None, :]  # [B, S, S]
        pre = torch.ones(b, seq_len, prefix_len, dtype=torch.bool, device=dev)
        return DenseAttention(b, seq_len, torch.cat([pre, own], dim=-1)[:, None], prefix_kv)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: DenseAttention, layer_idx: int,
                    scale: float) -> torch.Tensor:
    """q: [T, H, D], k/v: [T, KVH, D] of B padded sequences -> [T, H, D] (autograd-friendly)."""
    b, s = meta.batch, meta.seq_len
    qb = q.view(b, s, *q.shape[1:]).transpose(1, 2)  # [B, H, S, D]
    kb = k.view(b, s, *k.shape[1:]).transpose(1, 2)  # [B, KVH, S, D]
    vb = v.view(b, s, *v.shape[1:]).transpose(1, 2)
    if meta.prefix_kv is not None:
        pk, pv = meta.prefix_kv(layer_idx)  # [B or 1, KVH, P, D]
        kb = torch.cat([pk.to(kb.dtype).expand(b, -1, -1, -1), kb], dim=2)
        vb = torch.cat([pv.to(vb.dtype).expand(b, -1, -1, -1), vb], dim=2)
    o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=meta.mask, scale=scale,
                                       enable_gqa=kb.shape[1] != qb.shape[1])
    return o.transpose(1, 2).reshape(b * s, *q.shape[1:])


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    # caches: [num_blocks * block_size, KVH, D]; k, v: [T, KVH, D]
    k_cache.index_copy_(0, slot_mapping, k)
    v_cache.index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, block_size: int, scale: float) -> torch.Tensor:
    """q: [T, H, D] -> out [T, H, D]; the caches already hold this step's keys and values."""
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        out[:nd] = paged_decode(q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_lens, block_size, scale)
    if meta.prefills:
        paged_prefill(q, k_cache, v_cache, *meta.prefill_pack, scale, out)
    return out
