"""The Triton int4/int8 dequantizing matmul equals ref_quant_linear on fresh random weights: int4
groups 32/64/128 (with a ragged last group), GGUF Q4_0/Q4_1/Q8_0 blocks, int8 per channel; decode
(M = 1..16) and prefill shapes; fp32/fp16/bf16. Interpreter on the CPU, real sizes on CUDA.
Tolerance: fp32 1e-4; fp16/bf16 one rounding of the output (both dequantize to x's dtype first).
"""
from __future__ import annotations

import pytest
import torch

from kernels.quant import from_ggml_blocks, quantize_int4, quantize_int8
from kernels.quant_matmul import ref_quant_linear, triton_quant_linear
from kernels.triton_env import interpreting

pytestmark = pytest.mark.skipif(not (interpreting() or torch.cuda.is_available()),
                                reason="Triton needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _check(x, qw, bias=None):
    y = triton_quant_linear(x, qw, bias)
    ref = ref_quant_linear(x, qw, bias)
    tol = TOL[x.dtype]
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol * ref.float().abs().max().item())


def _weights(kind: str, N: int, K: int, g: torch.Generator):
    w = torch.randn(N, K, generator=g) * 0.05
    if kind.startswith("int4-g"):
        return quantize_int4(w, int(kind[6:]))
    if kind == "int8":
        return quantize_int8(w)
    if kind == "int8-g32":
        return quantize_int8(w, 32)
    # random GGUF blocks: fp16 scale (and min) then the packed values, as llama.cpp writes them
    nb = K // 32
    d = (torch.rand(N, nb, 1, generator=g) * 0.01 + 1e-3).half().view(torch.uint8)
    if kind == "Q8_0":
        q = torch.randint(-128, 128, (N, nb, 32), generator=g, dtype=torch.int8).view(torch.uint8)
        raw = torch.cat([d, q], -1)
    else:
        q = torch.randint(0, 256, (N, nb, 16), generator=g, dtype=torch.uint8)
        parts = [d] + ([(torch.randn(N, nb, 1, generator=g) * 0.02).half().view(torch.uint8)] if kind == "Q4_1" else [])
        raw = torch.cat(parts + [q], -1)
    return from_ggml_blocks(raw.reshape(N, -1), kind, K)


KINDS = ["int4-g32", "int4-g64", "int4-g128", "int8", "int8-g32", "Q4_0", "Q4_1", "Q8_0"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quant_matmul_small(kind, dtype):
    g = torch.Generator().manual_seed(hash((kind, str(dtype))) % 2**31)
    N, K = 80, 192  # K = 1.5 groups of 128: the ragged last group
    qw = _weights(kind, N, K, g).to(DEVICE)
    for M in (1, 5, 40):
        x = torch.randn(M, K, generator=g).to(dtype).to(DEVICE)
        _check(x, qw)
    bias = torch.randn(N, generator=g).to(dtype).to(DEVICE)
    _check(torch.randn(3, K, generator=g).to(dtype).to(DEVICE), qw, bias)


def test_quant_matmul_batched_leading_dims_and_strided_rows():
    g = torch.Generator().manual_seed(1)
    qw = _weights("int4-g32", 48, 64, g).to(DEVICE)
    x = torch.randn(2, 3, 128, generator=g).to(DEVICE)[..., :64]  # rows with a stride of 128
    y = triton_quant_linear(x, qw)
    assert y.shape == (2, 3, 48)
    torch.testing.assert_close(y, ref_quant_linear(x.reshape(-1, 64), qw).view(2, 3, 48), rtol=1e-4, atol=1e-4)


def test_quant_matmul_rejects_mismatched_features():
    qw = _weights("int8", 16, 64, torch.Generator().manual_seed(0)).to(DEVICE)
    with pytest.raises(ValueError, match="features"):
        triton_quant_linear(torch.randn(2, 32, device=DEVICE), qw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real sizes need CUDA")
@pytest.mark.parametrize("kind", ["int4-g128", "int4-g32", "int8", "Q4_1"])
@pytest.mark.parametrize("M", [1, 16, 64, 1024])
def test_quant_matmul_real_sizes_cuda(kind, M):
    g = torch.Generator().manual_seed(M)
    qw = _weights(kind, 4096, 4096, g).to("cuda")
    _check(torch.randn(M, 4096, generator=g).to(torch.bfloat16).cuda(), qw)
