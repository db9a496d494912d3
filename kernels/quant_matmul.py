"""y = x @ dequantize(w).T for int4/int8 weights (formats: kernels/quant.py), chosen once per device.

CPU: a small C++ extension (kernels/cpu/quant_gemm.cpp, built when the package is installed,
kernels/cpu_ext.py): a GEMV with dequantization fused into the dot products for small batches, a tiled
kernel (rows dequantized into L1, register-blocked over 32 batch rows) for many decoding
sequences, and dequantize-once + one sgemm for prefill. torch's own `_weight_int8pack_mm` /
`_weight_int4pack_mm_for_cpu` measured 6-40x slower than fp32 on this project's CPU with fp32
activations (bench/RESULTS.md), so they are not used. Kernel not built: the reference.
CUDA: `triton_quant_linear`, one Triton kernel that dequantizes tiles of the packed weight in
registers (never a dense copy in memory) and feeds tl.dot, for decode (GEMV-shaped, M <= 16: one row
block) and prefill (GEMM tiles) alike.
"""
from __future__ import annotations

import threading

import torch

from kernels import cpu_ext
from kernels.quant import QuantizedWeight, ref_dequantize
from kernels.triton_env import check, dot_in_fp32, jit, require_triton, tl, triton

# Which CPU kernel serves how many rows (crossovers measured on SmolLM2's 30 layers, 2026-11-30, 2
# threads): the GEMV up to 16 rows; the tiled kernel (14 dequantized rows in L1 times x^T, 14
# outputs x 32 rows of accumulators) up to 160 (int4) / 64 (int8) rows: int4 at 64 rows 87 ms against
# 141 ms dequantize+sgemm, at 128 rows 162 vs 186 ms, even at ~192; int8 even at ~80 (its
# dequantization is cheaper); beyond that, dequantize once and one sgemm.
GEMV_MAX_ROWS = 16
TILED_MAX_ROWS = {4: 160, 8: 64}


def ref_quant_linear(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Semantics: x @ ref_dequantize(w).T (+ bias). x: [T, K] -> [T, N]."""
    return torch.nn.functional.linear(x, ref_dequantize(w, x.dtype), bias)


def cpu_extension():
    """The compiled CPU int4/int8 kernels, or None (then the reference is used)."""
    return cpu_ext.load("quant_gemm", "int4/int8")


def dequantize(w: QuantizedWeight, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """ref_dequantize through the fastest path for the device (the CPU extension when built); fp32 results
    land in `out` (a flat buffer of at least N*K elements) when given."""
    ext = cpu_extension() if w.qweight.device.type == "cpu" else None
    if ext is None:
        return ref_dequantize(w, dtype)
    if out is None:
        out = torch.empty(w.shape[0] * w.shape[1])
    dense = (ext.int4_dequantize(w.qweight, w.scales, w.mins, w.group_size, out) if w.bits == 4
             else ext.int8_dequantize(w.qweight, w.scales, w.group_size, out))
    return dense.to(dtype)


_scratch = threading.local()  # per thread: the dense weight of the prefill path, reused across layers
SCRATCH_MAX = 1 << 22  # elements (16 MiB): a layer's weight; larger ones (an LM head) get their own buffer


def _scratch_buffer(numel: int) -> torch.Tensor:
    if numel > SCRATCH_MAX:
        return torch.empty(numel)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _scratch.buf = torch.empty(numel)
    return buf


def cpu_quant_linear(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    ext = cpu_extension()
    if ext is None or x.dtype != torch.float32:
        return ref_quant_linear(x, w, bias)
    x = x.contiguous()
    rows = x.shape[0]
    if rows <= GEMV_MAX_ROWS:
        y = (ext.int4_linear(x, w.qweight, w.scales, w.mins, w.group_size) if w.bits == 4
             else ext.int8_linear(x, w.qweight, w.scales, w.group_size))
        return y if bias is None else y.add_(bias)
    if rows <= TILED_MAX_ROWS[w.bits]:
        y = (ext.int4_linear_tiled(x, w.qweight, w.scales, w.mins, w.group_size) if w.bits == 4
             else ext.int8_linear_tiled(x, w.qweight, w.scales, w.group_size))
        return y if bias is None else y.add_(bias)
    return torch.nn.functional.linear(x, dequantize(w, out=_scratch_buffer(w.shape[0] * w.shape[1])), bias)


@jit
def _quant_matmul_kernel(x_ptr, stride_x, q_ptr, stride_q, s_ptr, mn_ptr, stride_s, b_ptr, y_ptr, stride_y,
                         M, N, K, G, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    m_ok = m < M
    n_ok = n < N
    n64 = n.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        k_ok = k < K
        w_ok = n_ok[:, None] & k_ok[None, :]
        xt = tl.load(x_ptr + m.to(tl.int64)[:, None] * stride_x + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                     other=0.0)
        g = k // G
        scale = tl.load(s_ptr + n64[:, None] * stride_s + g[None, :], mask=w_ok, other=0.0).to(tl.float32)
        if BITS == 4:
            # GGML block order: byte j of each 32-value block holds value j (low nibble) and j + 16 (high)
            byte = tl.load(q_ptr + n64[:, None] * stride_q + ((k // 32) * 16 + k % 16)[None, :], mask=w_ok, other=0)
            val = ((byte >> (((k % 32) // 16) * 4)[None, :]) & 0xF).to(tl.float32)
            lo = tl.load(mn_ptr + n64[:, None] * stride_s + g[None, :], mask=w_ok, other=0.0).to(tl.float32)
            w = val * scale + lo
        else:
            w = tl.load(q_ptr + n64[:, None] * stride_q + k[None, :], mask=w_ok, other=0).to(tl.float32) * scale
        w = w.to(x_ptr.dtype.element_ty)  # the weight as the reference rounds it for x's dtype
        if DOT_FP32:
            acc += tl.dot(xt.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + m.to(tl.int64)[:, None] * stride_y + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def triton_quant_linear(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ dequantize(w).T (+ bias) with dequantization fused into the matmul. x: [..., K] -> [..., N]."""
    require_triton()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    M, K = x2.shape
    N, Kw = w.shape
    check(K == Kw, f"x has {K} features, the weight {Kw}")
    check(x.dtype in (torch.float16, torch.bfloat16, torch.float32), f"x dtype {x.dtype}")
    check(w.qweight.is_contiguous() and w.scales.is_contiguous() and (w.mins is None or w.mins.is_contiguous()),
          "quantized tensors must be contiguous")
    check(bias is None or bias.shape == (N,), "bias must be [N]")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y.reshape(*lead, N)
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    block_n = 64 if M <= 16 else 128
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _quant_matmul_kernel[grid](x2, x2.stride(0), w.qweight, w.qweight.stride(0), w.scales,
                               w.mins if w.mins is not None else w.scales, w.scales.stride(0),
                               bias if bias is not None else y, y, y.stride(0), M, N, K, w.group_size,
                               BITS=w.bits, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
                               BLOCK_K=64, DOT_FP32=dot_in_fp32(x.dtype))
    return y.reshape(*lead, N)


class _QuantLinearGrad(torch.autograd.Function):
    """A quantized matmul inside autograd (QLoRA): the frozen weight gets no gradient; the input's
    gradient is grad_y @ dequantize(w), the weight dequantized only for the backward pass."""

    @staticmethod
    def forward(ctx, x, w: QuantizedWeight, bias, qmatmul):
        ctx.w = w
        return qmatmul(x, w, bias)

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y @ dequantize(ctx.w, grad_y.dtype), None, None, None


def quant_linear_with_grad(qmatmul, x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """qmatmul(x, w, bias), differentiable with respect to x."""
    return _QuantLinearGrad.apply(x, w, bias, qmatmul)


def quant_linear_for(device: torch.device):
    """The implementation for a device, picked once at start-up."""
    return cpu_quant_linear if device.type == "cpu" else triton_quant_linear
