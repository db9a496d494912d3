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

from kernels.quant import QuantizedWeight, quantize_int4, quantize_int8, ref_dequantize
from kernels.quant_matmul import quant_linear_for, quant_linear_with_grad


class AdapterApplier(Protocol):
    """Per-step adapter state (built once per step for all layers); see the LoRA issue."""

    def apply(self, layer: "Linear", x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def attention(self, attn, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """After an attention layer: q [T, H, D] its rotated queries, out [T, hidden] its o_proj output."""
        ...


class Linear(nn.Module):
    """y[t] = x[t] @ W.T (+ b), then each token's own adapter delta, for fused output slices.

    x: [T, in_features] -> y: [T, sum(out_slices)]. W is either a dense weight or a QuantizedWeight
    (int4/int8, kernels/quant.py) whose matmul implementation is chosen once, when it is set.
    """

    def __init__(self, in_features: int, out_slices: dict[str, int], bias: bool, *, layer_idx: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.in_features = in_features
        self.layer_idx = layer_idx
        self.key = 0  # index among the model's Linears, set by the model (adapter kernel metadata)
        self.slice_names = tuple(out_slices)
        self.slice_sizes = tuple(out_slices.values())
        self.out_features = sum(self.slice_sizes)
        offsets, start = {}, 0
        for name, size in out_slices.items():
            offsets[name] = (start, start + size)
            start += size
        self.slice_offsets = offsets  # name -> (start, end) rows of the fused weight
        self.slice_starts = tuple(start for start, _ in offsets.values())
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self.qweight: QuantizedWeight | None = None
        self._qmatmul = None  # the quantized matmul for this device, set with qweight
        self._packed_slices: dict[str, QuantizedWeight] = {}  # packed slices arriving one by one at load

    @property
    def nbytes(self) -> int:
        w = self.qweight.nbytes if self.qweight is not None else self.weight.numel() * self.weight.element_size()
        return w + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def forward(self, x: torch.Tensor, adapters: AdapterApplier | None = None) -> torch.Tensor:
        y = self.matmul(x)
        if adapters is not None:
            y = adapters.apply(self, x, y)
        return y

    def matmul(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """The base layer alone: x @ W.T (+ b), dense or quantized."""
        b = self.bias if bias else None
        if self.qweight is not None:
            if x.requires_grad and torch.is_grad_enabled():  # training adapters below a quantized base
                return quant_linear_with_grad(self._qmatmul, x, self.qweight, b)
            return self._qmatmul(x, self.qweight, b)
        return F.linear(x, self.weight, b)

    def slice_weight(self, name: str) -> torch.Tensor:
        """The [out, in] weight of one output slice, as the forward pass uses it (dequantized)."""
        start, end = self.slice_offsets[name]
        if self.qweight is not None:
            return ref_dequantize(self.qweight.rows(start, end), self.bias.dtype if self.bias is not None
                                  else torch.float32)
        return self.weight[start:end]

    # -- quantization -----------------------------------------------------------------------------
    def set_quantized(self, qw: QuantizedWeight) -> None:
        if qw.shape != (self.out_features, self.in_features):
            raise ValueError(f"layer {self.layer_idx}: quantized weight {qw.shape}, expected "
                             f"{(self.out_features, self.in_features)}")
        device = self.bias.device if self.bias is not None else (self.weight.device if self.weight is not None
                                                                 else torch.device("cpu"))
        self.qweight = qw.to(device)
        self._qmatmul = quant_linear_for(device)
        self.weight = None  # the dense copy is gone: this is where the memory goes down

    def dense_weight(self) -> torch.Tensor:
        return self.weight.data if self.qweight is None else ref_dequantize(self.qweight)

    def quantize_(self, bits: int, group_size: int) -> None:
        """Round-to-nearest from the dense weight (or from an existing quantized one of another format)."""
        if self.qweight is not None and self.qweight.bits == bits:
            return
        w = self.dense_weight().float()
        self.set_quantized(quantize_int4(w, group_size) if bits == 4 else quantize_int8(w))

    def dequantize_(self, dtype: torch.dtype) -> None:
        if self.qweight is None:
            return
        self.weight = nn.Parameter(ref_dequantize(self.qweight, dtype), requires_grad=False)
        self.qweight, self._qmatmul = None, None

    def load_packed_slice(self, name: str, qw: QuantizedWeight) -> None:
        """Take one packed projection; when every slice is in, the fused layer becomes quantized."""
        start, end = self.slice_offsets[name]
        if qw.shape != (end - start, self.in_features):
            raise ValueError(f"layer {self.layer_idx} {name}: weight shape {qw.shape}, expected "
                             f"{(end - start, self.in_features)}")
        self._packed_slices[name] = qw
        if len(self._packed_slices) == len(self.slice_names):
            parts = [self._packed_slices.pop(n) for n in self.slice_names]
            try:
                self.set_quantized(QuantizedWeight.cat(parts))
            except ValueError:  # slices in different GGML types: fall back to a dense fused weight
                with torch.no_grad():
                    for n, p in zip(self.slice_names, parts):
                        s0, s1 = self.slice_offsets[n]
                        self.weight[s0:s1].copy_(ref_dequantize(p))

    def load_slice(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Copy one Hugging Face projection ([out, in] weight, [out] bias) into its slice."""
        if isinstance(weight, QuantizedWeight):
            self.load_packed_slice(name, weight)
            if bias is not None:
                s0, s1 = self.slice_offsets[name]
                with torch.no_grad():
                    self.bias[s0:s1].copy_(bias)
            return
        if self.weight is None:
            raise ValueError(f"layer {self.layer_idx} {name}: a dense slice for a quantized layer")
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
