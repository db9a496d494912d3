"""Batched LoRA: each token gets its own adapter's low-rank delta, weights read from the paged pool.

Semantics (per segment s = the tokens `rows_s` of one adapter):
    y[rows_s, out_slice] += scale_s * (x[rows_s] @ A_s.T) @ Bt_s
with A_s [r_s, in] and Bt_s [r_s, out] stored as rows in fixed-size pages of one flat pool.
Tokens without an adapter are untouched. The plain-torch `ref_` functions here define the meaning;
the Triton kernels (kernels issue) must match them. On the CPU they are also the fast path.
"""
from __future__ import annotations

import torch

# Per-adapter descriptor of one fused linear layer, an int32 row of DESC_FIELDS (the kernels' metadata):
#   [a_vpage, rank, (bt_vpage, r0, r1) for each of up to MAX_SLICES output slices in fused order]
# a_vpage: first virtual page of A_cat [rank, in]; rank 0 = the layer is not adapted.
# Slice j: Bt_j [r1 - r0, width_j] from virtual page bt_vpage (scale folded in), using h[:, r0:r1];
# r0 == r1 = the slice is not adapted.
MAX_SLICES = 3
DESC_FIELDS = 2 + 3 * MAX_SLICES


def check_sgmv_metadata(device: torch.device, desc: torch.Tensor, *index_tensors: torch.Tensor) -> None:
    """The wrappers' shared checks of the SGMV metadata (ValueError: they guard callers' tensors)."""
    if not (desc.dim() == 3 and desc.shape[2] == DESC_FIELDS and desc.stride(2) == 1):
        raise ValueError("desc must be [A, keys, DESC_FIELDS]")
    if any(t.dtype != torch.int32 or t.device != device for t in (desc, *index_tensors)):
        raise ValueError("metadata must be int32 on the activations' device")


def row_block(max_len: int) -> int:
    """Token rows per program: the longest segment rounded up to 16, 32 or 64 (tl.dot needs >= 16)."""
    return 16 if max_len <= 16 else (32 if max_len <= 32 else 64)


def pool_view(pool: torch.Tensor, pages: torch.Tensor, rows: int, width: int) -> torch.Tensor | None:
    """pool[pages] as a [rows, width] view when the pages are consecutive, else None (no copy made)."""
    first, n = int(pages[0]), pages.numel()
    if int(pages[-1]) - first != n - 1 or (n > 1 and not bool((pages.diff() == 1).all())):
        return None  # (the span test alone would take a shuffled run such as 5, 7, 6, 8 for consecutive)
    return pool[first:first + n].view(rows, width)


def ref_gather_rows(pool: torch.Tensor, pages: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """Semantics: concat(pool[pages[i]] for i) viewed as [rows, width].

    pool: [num_pages, page_size]; pages: [n] int (n * page_size == rows * width).
    Returns a view when the pages are consecutive, a copy otherwise.
    """
    view = pool_view(pool, pages, rows, width)
    return view if view is not None else pool.index_select(0, pages.long()).view(rows, width)


def ref_paged_rows(pool: torch.Tensor, page_table: torch.Tensor, vpage: int, rows: int, width: int) -> torch.Tensor:
    """Semantics: the [rows, width] matrix stored from virtual page `vpage` of an adapter whose virtual
    page i lives in physical page page_table[i] of the pool (element e of the matrix, row-major, sits
    at virtual element vpage * page_size + e). Rows are whole pages (width % page_size == 0).

    pool: [num_pages, page_size]; page_table: [>= vpage + rows * width / page_size] int.
    """
    n = rows * width // pool.shape[1]
    return ref_gather_rows(pool, page_table[vpage:vpage + n], rows, width)


def ref_lora_add(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor, scale: float,
                 rows: torch.Tensor | None = None) -> None:
    """Semantics: y[rows] += scale * (x[rows] @ A.T) @ Bt, in place (rows=None: every row).

    y: [T, out] (may be a column slice of a fused output), x: [T, in], A: [r, in], Bt: [r, out].
    Accumulates in fp32 when x is not fp32.
    """
    xs = x if rows is None else x.index_select(0, rows)
    if xs.dtype != torch.float32:
        delta = ((xs.float() @ A.float().t()) @ Bt.float()).mul_(scale).to(y.dtype)
    else:
        delta = (xs @ A.t()) @ Bt
        delta.mul_(scale)
    if rows is None:
        y.add_(delta)
    else:
        y.index_add_(0, rows, delta)


def ref_scale_rows(y: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None,
                   rows: torch.Tensor | slice | None = None) -> None:
    """Semantics: y[rows] = (y[rows] - bias) * g + bias, in place (DoRA's base part; IA3-style output scaling).

    y: [T, out], g: [out], bias: [out] or None; rows: indices, a slice, or None for all.
    """
    if isinstance(rows, slice):
        y = y[rows]
        rows = None
    if rows is None:
        if bias is not None:
            y.sub_(bias).mul_(g).add_(bias)
        else:
            y.mul_(g)
        return
    sel = y.index_select(0, rows)
    sel = (sel - bias) * g + bias if bias is not None else sel * g
    y.index_copy_(0, rows, sel)
