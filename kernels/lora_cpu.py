"""Batched LoRA shrink/expand (SGMV) on the CPU: kernels/cpu/lora_sgmv.cpp behind the same signatures
as the Triton `lora_shrink` / `lora_expand` and the same semantics (their `ref_` functions).

One call per fused Linear covers every segment, rank and output slice, reading the adapters'
weights through their page tables (fp32 or bf16 pool pages, upcast exactly; fp32 activations and
accumulation). Segments are cut into blocks of at most 64 tokens, spread over the threads by cost;
an adapter's rows are read from memory once per block (AVX-512 register-blocked dot products for
shrink, 64-column accumulations for expand).
`available()` is False when the kernels are not built (kernels/cpu_ext.py): callers then use the per-segment torch path.
"""
from __future__ import annotations

import torch

from kernels import cpu_ext
from kernels.lora import check_sgmv_metadata, MAX_SLICES
from kernels.triton_env import check


def _ext():
    return cpu_ext.load("lora_sgmv", "batched LoRA (SGMV)")


def available() -> bool:
    return _ext() is not None


def _check_dtypes(act: torch.Tensor, h: torch.Tensor, pool: torch.Tensor) -> None:
    check(act.dtype == torch.float32 and pool.dtype in (torch.float32, torch.bfloat16),
          f"the CPU kernels take fp32 activations and an fp32/bf16 pool, got {act.dtype}, pool {pool.dtype}")
    check(h.dtype == torch.float32 and h.shape[0] == act.shape[0], "h must be fp32 [T, ranks]")


def cpu_lora_shrink(h: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, page_table: torch.Tensor,
                    pt_start: torch.Tensor, desc: torch.Tensor, key: int, seg_start: torch.Tensor,
                    seg_len: torch.Tensor, seg_slot: torch.Tensor, max_len: int = 0, max_rank: int = 0) -> torch.Tensor:
    """h[seg, :rank] = x[seg] @ A.T per segment (kernels/lora_shrink.py); max_len/max_rank unused here."""
    _check_dtypes(x, h, pool)
    check_sgmv_metadata(x.device, desc, page_table, pt_start, seg_start, seg_len, seg_slot)
    return _ext().lora_shrink(h, x, pool, page_table, pt_start, desc, key, seg_start, seg_len, seg_slot)


def cpu_lora_expand(y: torch.Tensor, h: torch.Tensor, pool: torch.Tensor, page_table: torch.Tensor,
                    pt_start: torch.Tensor, desc: torch.Tensor, key: int, col_starts: tuple[int, ...],
                    widths: tuple[int, ...], seg_start: torch.Tensor, seg_len: torch.Tensor, seg_slot: torch.Tensor,
                    max_len: int = 0) -> torch.Tensor:
    """y[seg, cols_j] += h[seg, r0:r1] @ Bt_j per segment and slice (kernels/lora_expand.py)."""
    _check_dtypes(y, h, pool)
    check(1 <= len(widths) <= MAX_SLICES and len(col_starts) == len(widths), f"1..{MAX_SLICES} output slices")
    check_sgmv_metadata(y.device, desc, page_table, pt_start, seg_start, seg_len, seg_slot)
    return _ext().lora_expand(y, h, pool, page_table, pt_start, desc, key, list(col_starts), list(widths),
                              seg_start, seg_len, seg_slot)


def cpu_lora_apply(y: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, page_table: torch.Tensor,
                   pt_start: torch.Tensor, desc: torch.Tensor, key: int, col_starts: tuple[int, ...],
                   widths: tuple[int, ...], seg_start: torch.Tensor, seg_len: torch.Tensor, seg_slot: torch.Tensor,
                   max_rank: int) -> torch.Tensor:
    """Shrink then expand in one call: y[seg, cols_j] += (x[seg] @ A.T)[:, r0:r1] @ Bt_j per segment.

    The per-step fast path (no DoRA step in between): the metadata is the step's, checked once when the
    step's batch was built (`check_sgmv_metadata`); the C++ side checks shapes, dtypes and ranges."""
    return _ext().lora_apply(y, x, pool, page_table, pt_start, desc, key, list(col_starts), list(widths),
                             seg_start, seg_len, seg_slot, max_rank)
