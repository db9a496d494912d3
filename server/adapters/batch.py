"""Per-step adapter metadata, built once for all layers, and the LoRA add at the linear seam.

`token_slots[t]` is the slot of token t's adapter in `adapters` (-1 = base model only). Tokens of
one adapter form a segment; segments are what the kernels iterate over. `apply` is called by every
`Linear` with its layer index and output slices.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.lora import ref_gather_rows, ref_lora_add, ref_scale_rows
from server.adapters.manager import DeviceModule


@dataclass
class Segment:
    modules: dict[tuple[int, str], DeviceModule]
    rows: torch.Tensor | None  # token rows [n] (int64); None = every token of the step


class LoraBatch:
    def __init__(self, pool: torch.Tensor, adapter_ids: list[str], segments: list[Segment],
                 token_slots: torch.Tensor):
        self.pool = pool  # [pages, page_size]
        self.adapter_ids = adapter_ids  # slot -> adapter id
        self.segments = segments  # one per slot
        self.token_slots = token_slots  # [T] int32

    @classmethod
    def build(cls, pool: torch.Tensor, spans: list[tuple[str | None, int, int]], num_tokens: int,
              modules_of, device: torch.device) -> "LoraBatch | None":
        """spans: (adapter id or None, first token row, token count) per sequence. None if no adapter runs."""
        rows: dict[str, list[int]] = {}
        for adapter_id, start, n in spans:
            if adapter_id is not None:
                rows.setdefault(adapter_id, []).extend(range(start, start + n))
        if not rows:
            return None
        ids = list(rows)
        slots = torch.full((num_tokens,), -1, dtype=torch.int32)
        segments = []
        for slot, adapter_id in enumerate(ids):
            r = torch.tensor(rows[adapter_id], dtype=torch.int64)
            slots[r] = slot
            segments.append(Segment(modules_of(adapter_id), None if r.numel() == num_tokens else r.to(device)))
        return cls(pool, ids, segments, slots.to(device))

    def apply(self, layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [T, out] = the base output of `layer` for x [T, in]; adds each token's adapter delta in place."""
        li = layer.layer_idx
        for seg in self.segments:
            for name in layer.slice_names:
                m = seg.modules.get((li, name))
                if m is None:
                    continue
                start, end = layer.slice_offsets[name]
                ys = y[:, start:end]
                A = m.A if m.A is not None else ref_gather_rows(self.pool, m.a_pages, m.rank, m.in_features)
                Bt = m.Bt if m.Bt is not None else ref_gather_rows(self.pool, m.bt_pages, m.rank, m.out_features)
                if m.dora_g is not None:
                    bias = None if layer.bias is None else layer.bias[start:end]
                    ref_scale_rows(ys, m.dora_g, bias, seg.rows)
                ref_lora_add(ys, x, A, Bt, m.scale, seg.rows)
        return y
