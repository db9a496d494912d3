"""RMSNorm, rotary embedding and SwiGLU for fp32 on the CPU: kernels/cpu/layer_ops.cpp (one pass over
memory each, no autograd) behind the torch expressions they replace, which are also their reference.

`rms_norm` / `rotary` / `silu_and_mul` take the C++ path only for inference on CPU fp32 tensors; with
gradients, on other devices or dtypes, or when the kernels are not built, they run the torch reference.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kernels import cpu_ext


def _ext():
    return cpu_ext.load("layer_ops", "RMSNorm/rotary")


def _fast(*ts: torch.Tensor) -> bool:
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in ts)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in ts)) and _ext() is not None)


def ref_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm: weight * (x * rsqrt(mean(x^2) + eps)), the statistics in fp32."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, D] -> [T, D]."""
    if x.dim() == 2 and _fast(x, weight):
        return _ext().rms_norm(x, weight, eps)
    return ref_rms_norm(x, weight, eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def ref_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [T, H, D], k [T, KVH, D], cos/sin [T, 1, D] -> (q, k) rotated: x * cos + rotate_half(x) * sin."""
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """ref_rotary; on the C++ path q and k are rotated in place (and returned)."""
    if q.dim() == 3 and k.dim() == 3 and _fast(q, k, cos, sin):
        _ext().rotary_(q, k, cos.reshape(cos.shape[0], -1), sin.reshape(sin.shape[0], -1))
        return q, k
    return ref_rotary(q, k, cos, sin)


@functools.lru_cache(maxsize=None)
def _silu_mul_ok() -> bool:
    return _ext() is not None and _ext().silu_mul_available()


def ref_silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> [T, I]: silu(gate) * up, the SwiGLU of Llama's MLP."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """ref_silu_and_mul in one pass (the same exp and rounding as torch's silu, bit-identical). Only for I a
    multiple of 32: torch's silu runs 32 lanes per loop step and leaves a shorter tail to scalar std::exp."""
    if gate_up.dim() == 2 and gate_up.shape[-1] % 64 == 0 and _fast(gate_up) and _silu_mul_ok():
        return _ext().silu_mul(gate_up)
    return ref_silu_and_mul(gate_up)
