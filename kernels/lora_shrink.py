"""Batched LoRA shrink (SGMV): each segment's tokens times its adapter's A, read through page tables.

Semantics: h[seg_i, :rank] = x[seg_i] @ A_a.T  for each segment i, a = seg_slot[i], where
seg_i = rows seg_start[i] .. seg_start[i] + seg_len[i] and A_a [rank, K] = ref_paged_rows(pool,
page_table[pt_start[a]:], desc[a, key, 0], rank, K) with rank = desc[a, key, 1] (0: skipped).
Accumulates in fp32; h is fp32 [T, >= max rank]; rows and columns outside the segments' ranks are
not written.

Shapes: x [T, K] (fp16/bf16/fp32, unit column stride); pool [pages, P] (x's dtype, K % P == 0);
page_table int32 [sum of adapters' pages]; pt_start int32 [A]; desc int32 [A, num_keys, DESC_FIELDS];
seg_start/seg_len/seg_slot int32 [S]. One launch covers every segment and every rank (mixed ranks:
programs past an adapter's rank exit at once). The grid depends only on (S, max_len, max_rank), which
the caller may fix to capture bounds for CUDA graphs; no host sync.
"""
from __future__ import annotations

import torch

from kernels.lora import check_sgmv_metadata, row_block, ref_paged_rows
from kernels.triton_env import check, dot_in_fp32, jit, require_triton, tl, triton


@jit
def _shrink_kernel(x_ptr, stride_x, h_ptr, stride_h, pool_ptr, pt_ptr, pt_start_ptr, desc_ptr, desc_stride,
                   key_off, seg_start_ptr, seg_len_ptr, seg_slot_ptr, K,
                   PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_FP32: tl.constexpr):
    seg = tl.program_id(0)
    mb = tl.program_id(1)
    rb = tl.program_id(2)
    start = tl.load(seg_start_ptr + seg)
    n = tl.load(seg_len_ptr + seg)
    slot = tl.load(seg_slot_ptr + seg)
    d = desc_ptr + slot.to(tl.int64) * desc_stride + key_off
    vpage = tl.load(d)
    rank = tl.load(d + 1)
    if (mb * BLOCK_M >= n) | (rb * BLOCK_R >= rank):
        return
    pts = tl.load(pt_start_ptr + slot)
    m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    kk = tl.arange(0, BLOCK_K)
    m_ok = m < n
    r_ok = r < rank
    rows = (start + m).to(tl.int64)
    a_row = vpage.to(tl.int64) * PAGE + r.to(tl.int64) * K  # virtual element of each A row's start
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        k_ok = k < K
        xt = tl.load(x_ptr + rows[:, None] * stride_x + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        v = a_row[:, None] + k[None, :]
        a_ok = r_ok[:, None] & k_ok[None, :]
        page = tl.load(pt_ptr + pts + v // PAGE, mask=a_ok, other=0)
        at = tl.load(pool_ptr + page.to(tl.int64) * PAGE + v % PAGE, mask=a_ok, other=0.0)
        if DOT_FP32:
            acc += tl.dot(xt.to(tl.float32), tl.trans(at.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(at))
    tl.store(h_ptr + rows[:, None] * stride_h + r[None, :], acc, mask=m_ok[:, None] & r_ok[None, :])


def lora_shrink(h: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, page_table: torch.Tensor,
                pt_start: torch.Tensor, desc: torch.Tensor, key: int, seg_start: torch.Tensor,
                seg_len: torch.Tensor, seg_slot: torch.Tensor, max_len: int, max_rank: int) -> torch.Tensor:
    """The Triton SGMV shrink (semantics in the module docstring); writes into and returns h."""
    require_triton()
    T, K = x.shape
    P = pool.shape[1]
    check(x.dtype == pool.dtype and x.dtype in (torch.float16, torch.bfloat16, torch.float32),
          f"x {x.dtype} and pool {pool.dtype} must share a float dtype")
    check(h.dtype == torch.float32 and h.shape[0] == T and h.shape[1] >= max_rank, "h must be fp32 [T, >= max_rank]")
    check(x.stride(1) == 1 and h.stride(1) == 1 and pool.is_contiguous(), "x, h need unit column stride; pool contiguous")
    check(K % P == 0, f"in_features {K} is not a multiple of the page size {P}")
    check_sgmv_metadata(x.device, desc, page_table, pt_start, seg_start, seg_len, seg_slot)
    S = seg_start.numel()
    if S == 0 or max_len == 0 or max_rank == 0:
        return h
    block_m = row_block(max_len)
    block_r = 16 if max_rank <= 16 else (32 if max_rank <= 32 else 64)
    grid = (S, triton.cdiv(max_len, block_m), triton.cdiv(max_rank, block_r))
    _shrink_kernel[grid](x, x.stride(0), h, h.stride(0), pool, page_table, pt_start, desc, desc.stride(0),
                         key * desc.stride(1), seg_start, seg_len, seg_slot, K,
                         PAGE=P, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=64, DOT_FP32=dot_in_fp32(x.dtype))
    return h


def ref_lora_shrink(h: torch.Tensor, x: torch.Tensor, pool: torch.Tensor, page_table: torch.Tensor,
                    pt_start: torch.Tensor, desc: torch.Tensor, key: int, seg_start: torch.Tensor,
                    seg_len: torch.Tensor, seg_slot: torch.Tensor) -> torch.Tensor:
    """The semantics in plain torch (fp32), one segment at a time."""
    K = x.shape[1]
    for start, n, slot in zip(seg_start.tolist(), seg_len.tolist(), seg_slot.tolist()):
        vpage, rank = desc[slot, key, 0].item(), desc[slot, key, 1].item()
        if n == 0 or rank == 0:
            continue
        A = ref_paged_rows(pool, page_table[int(pt_start[slot]):].long(), vpage, rank, K)
        h[start:start + n, :rank] = x[start:start + n].float() @ A.float().t()
    return h
