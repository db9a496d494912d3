"""Small building blocks of the Llama family: RMSNorm, rotary embedding, SwiGLU."""
from __future__ import annotations

import torch
from torch import nn

from kernels.layer_ops import rms_norm, rotary, silu_and_mul  # noqa: F401  (silu_and_mul: the MLP's SwiGLU)


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 like Hugging Face's LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)  # x: [T, dim] (or [B, S, dim] in training)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with a precomputed cos/sin table.

    The inverse frequencies come from transformers' own rope functions (default, linear, llama3,
    yarn, ...), so every rope variant a Hugging Face config names means the same thing here.
    """

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float, max_positions: int,
                 device: torch.device):
        super().__init__()
        pos = torch.arange(max_positions, dtype=torch.float32, device=device)
        freqs = pos[:, None] * inv_freq.to(device=device, dtype=torch.float32)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, head_dim]
        self.register_buffer("cos", emb.cos() * attention_scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * attention_scaling, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin), each [T, 1, head_dim]: looked up once per step for all layers."""
        return self.cos[positions].to(dtype).unsqueeze(1), self.sin[positions].to(dtype).unsqueeze(1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    # q: [T, H, D]; k: [T, KVH, D]; cos, sin: [T, 1, D] (inference on the CPU: rotated in place)
    return rotary(q, k, cos, sin)
