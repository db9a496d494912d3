"""y = x @ dequantize(w).T for int4/int8 weights (formats: kernels/quant.py), chosen once per device.

CPU: a small C++ extension (kernels/cpu/quant_gemm.cpp, built on first use with torch's
cpp_extension) that fuses dequantization into the dot products for decode-sized batches and
dequantizes once then runs one sgemm for prefill. torch's own `_weight_int8pack_mm` /
`_weight_int4pack_mm_for_cpu` measured 6-40x slower than fp32 on this project's CPU with fp32
activations (bench/RESULTS.md), so they are not used. Without a compiler: the reference.
CUDA: the reference until the Triton kernels (kernels issue) land.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from kernels.quant import QuantizedWeight, ref_dequantize

log = logging.getLogger("tessera.kernels")
GEMV_MAX_ROWS = 16  # above this many rows, dequantize once and use one sgemm (measured crossover)


def ref_quant_linear(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Semantics: x @ ref_dequantize(w).T (+ bias). x: [T, K] -> [T, N]."""
    return torch.nn.functional.linear(x, ref_dequantize(w, x.dtype), bias)


@functools.lru_cache(maxsize=1)
def cpu_extension():
    """The compiled CPU kernels, or None (then the reference is used)."""
    try:
        from torch.utils.cpp_extension import load

        src = Path(__file__).resolve().parent / "cpu" / "quant_gemm.cpp"
        log.info("building the CPU int4/int8 kernels (first use only; cached by torch's cpp_extension)")
        return load(name="tessera_quant_gemm", sources=[str(src)], extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                    verbose=False)
    except Exception as exc:  # no compiler, no headers: fall back, loudly
        log.warning("CPU int4/int8 kernels unavailable (%s); using the slower reference path", exc)
        return None


def cpu_quant_linear(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    ext = cpu_extension()
    if ext is None or x.dtype != torch.float32:
        return ref_quant_linear(x, w, bias)
    x = x.contiguous()
    if x.shape[0] <= GEMV_MAX_ROWS:
        if w.bits == 4:
            y = ext.int4_linear(x, w.qweight, w.scales, w.mins, w.group_size)
        else:
            y = ext.int8_linear(x, w.qweight, w.scales, w.group_size)
        return y if bias is None else y.add_(bias)
    dense = (ext.int4_dequantize(w.qweight, w.scales, w.mins, w.group_size) if w.bits == 4
             else ext.int8_dequantize(w.qweight, w.scales, w.group_size))
    return torch.nn.functional.linear(x, dense, bias)


def quant_linear_for(device: torch.device):
    """The implementation for a device, picked once at start-up."""
    return cpu_quant_linear if device.type == "cpu" else ref_quant_linear
