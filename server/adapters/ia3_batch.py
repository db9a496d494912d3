"""Per-step IA3 application: each IA3 adapter's tokens get its scaling vectors (kernels/ia3.py)."""
from __future__ import annotations

import torch

from kernels.ia3 import ref_ia3_input, ref_ia3_output
from server.adapters.batch import adapter_ranges


class Ia3Batch:
    def __init__(self, segments: list[tuple[slice, dict]]):
        self.segments = segments  # (token rows, {(layer, module): (vector, scales input?)})

    @classmethod
    def build(cls, spans: list[tuple[str, int, int]], adapter_of) -> "Ia3Batch":
        return cls([(rows, adapter_of(a).vectors) for a, rs in adapter_ranges(spans).items() for rows in rs])

    def apply(self, layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for rows, vectors in self.segments:
            for name in layer.slice_names:
                v = vectors.get((layer.layer_idx, name))
                if v is None:
                    continue
                vec, is_input = v
                cols = layer.slice_offsets[name]
                if is_input:
                    ref_ia3_input(y, x, rows, cols, vec, lambda t: layer.matmul(t, bias=False))
                else:
                    ref_ia3_output(y, rows, cols, vec)
        return y

    def attention(self, attn, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out  # acts in the linear seam only

