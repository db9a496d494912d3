"""IA3's per-token channel scaling at the linear seam (the semantics; on every device this is the path).

Semantics, for the tokens `rows` of one IA3 adapter and one module slice `cols` of a Linear y = W x + b:
    output scaling:  y[rows, cols] = (W x + b)[rows, cols] * l          (l: [out], bias scaled too, as PEFT)
    input scaling:   y[rows, cols] = (W (x * l) + b)[rows, cols]
                                   = y[rows, cols] + (W (x[rows] * (l - 1)))[:, cols]   (l: [in])
"""
from __future__ import annotations

import torch


def ref_ia3_output(y: torch.Tensor, rows: slice, cols: tuple[int, int], l: torch.Tensor) -> None:
    y[rows, cols[0]:cols[1]] *= l


def ref_ia3_input(y: torch.Tensor, x: torch.Tensor, rows: slice, cols: tuple[int, int], l: torch.Tensor,
                  matmul) -> None:
    """matmul(x) -> W x without bias, [n, out] of the whole (fused) layer."""
    y[rows, cols[0]:cols[1]] += matmul(x[rows] * (l - 1))[:, cols[0]:cols[1]]
