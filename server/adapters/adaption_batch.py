"""Per-step LLaMA-Adapter (adaption prompt) attention for the tokens of each such adapter."""
from __future__ import annotations

import math

import torch

from server.adapters.batch import adapter_ranges


class AdaptionBatch:
    def __init__(self, segments: list[tuple[slice, object]]):
        self.segments = segments  # (token rows, AdaptionAdapter)

    @classmethod
    def build(cls, spans: list[tuple[str, int, int]], adapter_of) -> "AdaptionBatch":
        return cls([(rows, adapter_of(a)) for a, rs in adapter_ranges(spans).items() for rows in rs])

    def apply(self, layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y  # acts after attention only

    def attention(self, attn, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out[rows] += o_proj(gate * softmax(q K^T / sqrt(D)) V) for each adapter's tokens (loader/adapters/adaption_prompt.py)."""
        for rows, a in self.segments:
            kvg = a.layers.get(attn.layer_idx)
            if kvg is None:
                continue
            k, v, gate = kvg  # [len, H, D], [len, H, D], [1]
            qs = q[rows]  # [n, H, D]
            scores = torch.einsum("nhd,lhd->hnl", qs, k.to(qs.dtype)) / math.sqrt(qs.shape[-1])
            p = gate * torch.softmax(scores, dim=-1, dtype=torch.float32).to(qs.dtype)
            o = torch.einsum("hnl,lhd->nhd", p, v.to(qs.dtype)).reshape(qs.shape[0], -1)
            out[rows] += attn.o_proj.matmul(o)
        return out
