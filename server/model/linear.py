"""The one linear layer of the model: the seam where adapters and quantized weights plug in.

Every projection (q/k/v, o, gate/up, down) is a `Linear`. Fused projections keep their parts as
named output slices (`q_proj`, `k_proj`, `v_proj`), so per-module adapters (LoRA, IA3, DoRA) can
address each slice of one fused matmul without the model code knowing about them.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class AdapterApplier(Protocol):
    """Per-step adapter state (built once per step for all layers); see the LoRA issue."""

    def apply(self, layer: "Linear", x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


class Linear(nn.Module):
    """y[t] = x[t] @ W.T (+ b), then each token's own adapter delta, for fused output slices.

    x: [T, in_features] -> y: [T, sum(out_slices)].
    """

    def __init__(self, in_features: int, out_slices: dict[str, int], bias: bool, *, layer_idx: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.in_features = in_features
        self.layer_idx = layer_idx
        self.slice_names = tuple(out_slices)
        self.slice_sizes = tuple(out_slices.values())
        self.out_features = sum(self.slice_sizes)
        offsets, start = {}, 0
        for name, size in out_slices.items():
            offsets[name] = (start, start + size)
            start += size
        self.slice_offsets = offsets  # name -> (start, end) rows of the fused weight
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    def forward(self, x: torch.Tensor, adapters: AdapterApplier | None = None) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if adapters is not None:
            y = adapters.apply(self, x, y)
        return y

    def slice_weight(self, name: str) -> torch.Tensor:
        """The [out, in] weight of one output slice, as the forward pass uses it."""
        start, end = self.slice_offsets[name]
        return self.weight[start:end]

    def load_slice(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Copy one Hugging Face projection ([out, in] weight, [out] bias) into its slice."""
        start, end = self.slice_offsets[name]
        expected = (end - start, self.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(f"layer {self.layer_idx} {name}: weight shape {tuple(weight.shape)}, expected {expected}")
        with torch.no_grad():
            self.weight[start:end].copy_(weight)
            if bias is not None:
                if self.bias is None:
                    raise ValueError(f"layer {self.layer_idx} {name}: checkpoint has a bias, the config says none")
                self.bias[start:end].copy_(bias)
