"""Per-step adapter metadata as tensors for the SGMV kernels: Triton on CUDA, C++ on the CPU.

Built once per step for all layers, from what each resident adapter already keeps on the device
(its page table and one descriptor row per fused layer, server/adapters/layout.py):
    seg_start/seg_len/seg_slot [S]   contiguous token ranges and their adapter's slot in this step
    page_table, pt_start             the active adapters' page tables back to back, where each starts
    desc [A, num Linears, F]         their descriptors, stacked
Each Linear then costs two launches whatever the mix of adapters and ranks (one call on the CPU, where
the two are fused unless a DoRA adapter runs in the step):
    lora_shrink: h[seg] = x[seg] @ A_cat.T    lora_expand: y[seg, slice_j] += h[seg, r0:r1] @ Bt_j
Layers no active adapter targets are skipped on the host. DoRA's base scaling (rare) runs in torch.
`sgmv_ops` picks the kernels for the device and dtype (None: the torch path of batch.py instead).
"""
from __future__ import annotations

import torch

from kernels import lora_cpu
from kernels.lora import check_sgmv_metadata
from kernels.lora_expand import lora_expand
from kernels.lora_shrink import lora_shrink
from server.adapters.batch import adapter_ranges, scale_dora
from server.adapters.layout import ResidentGroup


def sgmv_ops(device: torch.device, dtype: torch.dtype, pool_dtype: torch.dtype):
    """(shrink, expand, fused or None) for activations of `dtype` and a pool of `pool_dtype` on `device`, or
    None when no kernel takes them (Triton: one dtype for both; the CPU kernels: fp32 activations, fp32/bf16
    pool). The fused op (CPU) does both in one call for steps without DoRA."""
    if device.type == "cuda" and dtype == pool_dtype:
        return lora_shrink, lora_expand, None
    if device.type == "cpu" and dtype == torch.float32 and pool_dtype in (torch.float32, torch.bfloat16) \
            and lora_cpu.available():
        return lora_cpu.cpu_lora_shrink, lora_cpu.cpu_lora_expand, lora_cpu.cpu_lora_apply
    return None


class KernelLoraBatch:
    def __init__(self, pool: torch.Tensor, adapter_ids: list[str], meta: torch.Tensor, page_table: torch.Tensor,
                 pt_start: torch.Tensor, desc: torch.Tensor, max_len: int, max_rank: int, adapted: set[int],
                 dora: list[tuple[slice, dict[tuple[int, str], ResidentGroup]]], ops=(lora_shrink, lora_expand, None)):
        self.pool = pool  # [pages, page_size]
        self.adapter_ids = adapter_ids  # slot -> adapter id
        self.seg_start, self.seg_len, self.seg_slot = meta  # int32 [S] each
        self.page_table, self.pt_start, self.desc = page_table, pt_start, desc
        self.max_len, self.max_rank = max_len, max_rank
        self.adapted = adapted  # Linear keys some active adapter targets
        self.dora = dora  # (token rows, groups) of DoRA adapters
        self.shrink, self.expand, fused = ops
        self.fused = None if dora else fused  # DoRA scales y between shrink and expand

    @classmethod
    def build(cls, pool: torch.Tensor, spans: list[tuple[str | None, int, int]], num_tokens: int,
              resident_of, device: torch.device, ops=(lora_shrink, lora_expand, None)) -> "KernelLoraBatch | None":
        ranges = adapter_ranges(spans)
        if not ranges:
            return None
        ids = list(ranges)
        res = [resident_of(a) for a in ids]
        segs = [(r.start, r.stop - r.start, slot) for slot, a in enumerate(ids) for r in ranges[a]]
        meta = torch.tensor(segs, dtype=torch.int32).t().contiguous().to(device, non_blocking=True)
        sizes = [r.page_table.numel() for r in res]
        pt_start = torch.tensor([sum(sizes[:i]) for i in range(len(sizes))], dtype=torch.int32).to(device)
        adapted = set().union(*(r.adapted for r in res))
        dora = [(rows, r.groups) for a, r in zip(ids, res) if r.has_dora for rows in ranges[a]]
        page_table, desc = torch.cat([r.page_table for r in res]), torch.stack([r.desc for r in res])
        check_sgmv_metadata(device, desc, page_table, pt_start, *meta)  # once per step, for every layer
        return cls(pool, ids, meta, page_table, pt_start, desc, max(n for _, n, _ in segs),
                   max(r.max_rank for r in res), adapted, dora, ops)

    def apply(self, layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [T, out] = the base output of `layer` for x [T, in]; adds each token's adapter delta in place."""
        if layer.key not in self.adapted:
            return y
        if self.fused is not None:
            return self.fused(y, x, self.pool, self.page_table, self.pt_start, self.desc, layer.key,
                              layer.slice_starts, layer.slice_sizes, self.seg_start, self.seg_len, self.seg_slot,
                              self.max_rank)
        h = torch.empty(x.shape[0], self.max_rank, dtype=torch.float32, device=x.device)
        self.shrink(h, x, self.pool, self.page_table, self.pt_start, self.desc, layer.key, self.seg_start,
                    self.seg_len, self.seg_slot, self.max_len, self.max_rank)
        key = (layer.layer_idx, layer.slice_names[0])
        for rows, groups in self.dora:
            if key in groups:
                scale_dora(layer, groups[key], y, rows)
        self.expand(y, h, self.pool, self.page_table, self.pt_start, self.desc, layer.key, layer.slice_starts,
                    layer.slice_sizes, self.seg_start, self.seg_len, self.seg_slot, self.max_len)
        return y

    def attention(self, attn, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out  # acts in the linear seam only

