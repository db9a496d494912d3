"""Batched LoRA expand (SGMV): each segment's shrunk activations times its adapter's Bt, into y's slices.

Semantics: for each segment i (a = seg_slot[i]) and output slice j with (bt_vpage, r0, r1) =
desc[a, key, 2 + 3j : 5 + 3j] and r1 > r0:
    y[seg_i, cols_j] += h[seg_i, r0:r1] @ Bt_j,   Bt_j [r1 - r0, width_j] = ref_paged_rows(pool,
    page_table[pt_start[a]:], bt_vpage, r1 - r0, width_j)
in fp32 (h is fp32; Bt upcast), rounded once into y's dtype. cols_j = col_starts[j] .. + widths[j].
Tokens outside every segment and slices an adapter does not target are untouched. Bt already holds
the adapter's scale (the layout folds it in at load).

Shapes: y [T, N] (fp16/bf16/fp32, unit column stride); h fp32 [T, >= max rank]; pool [pages, P]
(y's dtype, every width % P == 0); metadata as in lora_shrink. One launch covers all segments and all
slices (q/k/v, gate/up). Grid from (S, max_len, max width): fixed bounds allow CUDA-graph capture.
"""
from __future__ import annotations

import torch

from kernels.lora import check_sgmv_metadata, row_block, MAX_SLICES, ref_paged_rows
from kernels.triton_env import check, jit, require_triton, tl, triton


@jit
def _expand_kernel(y_ptr, stride_y, h_ptr, stride_h, pool_ptr, pt_ptr, pt_start_ptr, desc_ptr, desc_stride,
                   key_off, seg_start_ptr, seg_len_ptr, seg_slot_ptr, n_blocks,
                   c0, c1, c2, w0, w1, w2,
                   PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    seg = tl.program_id(0)
    mb = tl.program_id(1)
    j = tl.program_id(2) // n_blocks
    nb = tl.program_id(2) % n_blocks
    col = tl.where(j == 0, c0, tl.where(j == 1, c1, c2))
    width = tl.where(j == 0, w0, tl.where(j == 1, w1, w2))
    start = tl.load(seg_start_ptr + seg)
    n = tl.load(seg_len_ptr + seg)
    slot = tl.load(seg_slot_ptr + seg)
    d = desc_ptr + slot.to(tl.int64) * desc_stride + key_off + 2 + 3 * j
    bt_vpage = tl.load(d)
    r0 = tl.load(d + 1)
    rank = tl.load(d + 2) - r0
    if (mb * BLOCK_M >= n) | (nb * BLOCK_N >= width) | (rank <= 0):
        return
    pts = tl.load(pt_start_ptr + slot)
    m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    cn = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    m_ok = m < n
    n_ok = cn < width
    rows = (start + m).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, rank, BLOCK_K):
        k = k0 + kk
        k_ok = k < rank
        ht = tl.load(h_ptr + rows[:, None] * stride_h + (r0 + k)[None, :], mask=m_ok[:, None] & k_ok[None, :],
                     other=0.0)
        v = bt_vpage.to(tl.int64) * PAGE + k.to(tl.int64)[:, None] * width + cn[None, :]
        b_ok = k_ok[:, None] & n_ok[None, :]
        page = tl.load(pt_ptr + pts + v // PAGE, mask=b_ok, other=0)
        bt = tl.load(pool_ptr + page.to(tl.int64) * PAGE + v % PAGE, mask=b_ok, other=0.0)
        acc += tl.dot(ht, bt.to(tl.float32), input_precision="ieee")
    y_at = y_ptr + rows[:, None] * stride_y + (col + cn)[None, :]
    y_ok = m_ok[:, None] & n_ok[None, :]
    yv = tl.load(y_at, mask=y_ok, other=0.0)
    tl.store(y_at, (yv.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=y_ok)


def lora_expand(y: torch.Tensor, h: torch.Tensor, pool: torch.Tensor, page_table: torch.Tensor,
                pt_start: torch.Tensor, desc: torch.Tensor, key: int, col_starts: tuple[int, ...],
                widths: tuple[int, ...], seg_start: torch.Tensor, seg_len: torch.Tensor, seg_slot: torch.Tensor,
                max_len: int) -> torch.Tensor:
    """The Triton SGMV expand (semantics in the module docstring); adds into and returns y."""
    require_triton()
    P = pool.shape[1]
    ns = len(widths)
    check(1 <= ns <= MAX_SLICES and len(col_starts) == ns, f"1..{MAX_SLICES} output slices")
    check(y.dtype == pool.dtype and y.dtype in (torch.float16, torch.bfloat16, torch.float32),
          f"y {y.dtype} and pool {pool.dtype} must share a float dtype")
    check(h.dtype == torch.float32 and h.shape[0] == y.shape[0], "h must be fp32 [T, ranks]")
    check(y.stride(1) == 1 and h.stride(1) == 1 and pool.is_contiguous(), "y, h need unit column stride; pool contiguous")
    check(all(w % P == 0 for w in widths) and col_starts[-1] + widths[-1] <= y.shape[1], "slice widths/columns")
    check_sgmv_metadata(y.device, desc, page_table, pt_start, seg_start, seg_len, seg_slot)
    S = seg_start.numel()
    if S == 0 or max_len == 0:
        return y
    c = tuple(col_starts) + (0,) * (MAX_SLICES - ns)
    w = tuple(widths) + (0,) * (MAX_SLICES - ns)
    block_m = row_block(max_len)
    block_n = 64
    n_blocks = triton.cdiv(max(widths), block_n)
    grid = (S, triton.cdiv(max_len, block_m), ns * n_blocks)
    _expand_kernel[grid](y, y.stride(0), h, h.stride(0), pool, page_table, pt_start, desc, desc.stride(0),
                         key * desc.stride(1), seg_start, seg_len, seg_slot, n_blocks, *c, *w,
                         PAGE=P, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=16)
    return y


def ref_lora_expand(y: torch.Tensor, h: torch.Tensor, pool: torch.Tensor, page_table: torch.Tensor,
                    pt_start: torch.Tensor, desc: torch.Tensor, key: int, col_starts: tuple[int, ...],
                    widths: tuple[int, ...], seg_start: torch.Tensor, seg_len: torch.Tensor,
                    seg_slot: torch.Tensor) -> torch.Tensor:
    """The semantics in plain torch (fp32), one segment and slice at a time."""
    for start, n, slot in zip(seg_start.tolist(), seg_len.tolist(), seg_slot.tolist()):
        pt = page_table[int(pt_start[slot]):].long()
        for j, (c, w) in enumerate(zip(col_starts, widths)):
            bt_vpage, r0, r1 = desc[slot, key, 2 + 3 * j: 5 + 3 * j].tolist()
            if n == 0 or r1 <= r0:
                continue
            Bt = ref_paged_rows(pool, pt, bt_vpage, r1 - r0, w)
            ys = y[start:start + n, c:c + w]
            ys.copy_((ys.float() + h[start:start + n, r0:r1] @ Bt.float()).to(y.dtype))
    return y
