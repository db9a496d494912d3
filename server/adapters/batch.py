"""Per-step adapter metadata, built once for all layers, and the LoRA add at the linear seam (torch path).

`token_slots[t]` is the slot of token t's adapter in `adapter_ids` (-1 = base model only). The
scheduler orders a step's sequences by adapter (within decodes and within prefills), so the tokens
of one adapter form at most two contiguous ranges: its segment. Segments are what kernels iterate over. `apply` is called by every `Linear`
with its layer index and output slices:
    h = x[seg] @ A_cat.T                    (one shrink for all adapted slices of the fused layer)
    y[seg, slice] += h[:, r0:r1] @ Bt       (Bt already scaled; DoRA: base part scaled by g first)
This is the plain-torch path (pool views and BLAS calls per segment), used where no kernel takes the
step: the C++ kernels not built (kernels/cpu_ext.py), or dtypes the kernels do not serve. Normally the same step runs as two
kernel calls per layer, Triton on CUDA and C++ on the CPU (server/adapters/kernel_batch.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.lora import ref_gather_rows, ref_scale_rows
from server.adapters.layout import ResidentGroup


def adapter_ranges(spans: list[tuple[str | None, int, int]]) -> dict[str, list[slice]]:
    """(adapter id or None, first row, count) per sequence -> each adapter's contiguous token ranges."""
    out: dict[str, list[slice]] = {}
    for adapter_id, start, n in spans:
        if adapter_id is None:
            continue
        rs = out.setdefault(adapter_id, [])
        if rs and rs[-1].stop == start:
            rs[-1] = slice(rs[-1].start, start + n)
        else:
            rs.append(slice(start, start + n))
    return out


def scale_dora(layer, g: ResidentGroup, y: torch.Tensor, rows: slice) -> None:
    """DoRA's base part for one adapter's tokens, before its LoRA add: y = (y - b) * g + b per DoRA slice."""
    for s in g.slices:
        if s.dora_g is not None:
            c0, c1 = s.cols
            ref_scale_rows(y[rows, c0:c1], s.dora_g, None if layer.bias is None else layer.bias[c0:c1])


@dataclass
class Segment:
    groups: dict[tuple[int, str], ResidentGroup]
    rows: list[slice]  # contiguous token ranges of this adapter


class LoraBatch:
    def __init__(self, pool: torch.Tensor, adapter_ids: list[str], segments: list[Segment],
                 token_slots: torch.Tensor):
        self.pool = pool  # [pages, page_size]
        self.adapter_ids = adapter_ids  # slot -> adapter id
        self.segments = segments  # one per slot
        self.token_slots = token_slots  # [T] int32

    @classmethod
    def build(cls, pool: torch.Tensor, spans: list[tuple[str | None, int, int]], num_tokens: int,
              resident_of, device: torch.device) -> "LoraBatch | None":
        """spans: (adapter id or None, first token row, token count) per sequence. None if no adapter runs."""
        ranges = adapter_ranges(spans)
        if not ranges:
            return None
        slots = torch.full((num_tokens,), -1, dtype=torch.int32)
        segments = []
        for slot, (adapter_id, rs) in enumerate(ranges.items()):
            for r in rs:
                slots[r] = slot
            segments.append(Segment(resident_of(adapter_id).groups, rs))
        return cls(pool, list(ranges), segments, slots.to(device))

    def apply(self, layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [T, out] = the base output of `layer` for x [T, in]; adds each token's adapter delta in place."""
        key = (layer.layer_idx, layer.slice_names[0])
        for seg in self.segments:
            g = seg.groups.get(key)
            if g is None:
                continue
            A = g.A if g.A is not None else ref_gather_rows(self.pool, g.a_pages, g.rank, g.in_features)
            A = A.to(x.dtype)  # a pool in another dtype (--lora-dtype) is upcast here
            for rows in seg.rows:
                h = x[rows] @ A.t()  # [n, sum r]
                scale_dora(layer, g, y, rows)
                for s in g.slices:
                    Bt = s.Bt if s.Bt is not None else ref_gather_rows(self.pool, s.bt_pages, s.r1 - s.r0,
                                                                       s.out_features)
                    Bt = Bt.to(y.dtype)
                    y[rows, s.cols[0]:s.cols[1]].addmm_(h[:, s.r0:s.r1], Bt)
        return y

    def attention(self, attn, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out  # acts in the linear seam only


class StepAdapters:
    """Several appliers in one step (LoRA tokens, IA3 tokens, ...): each touches only its own rows."""

    def __init__(self, appliers: list):
        self.appliers = appliers

    def apply(self, layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for a in self.appliers:
            y = a.apply(layer, x, y)
        return y

    def attention(self, attn, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        for a in self.appliers:
            out = a.attention(attn, q, out)
        return out
