"""Rotary inverse frequencies for a ModelConfig, delegated to transformers' rope functions."""
from __future__ import annotations

import torch
from transformers import AutoConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from loader.config import ModelConfig

# Rope types whose frequencies change with the running sequence length are not served.
_UNSUPPORTED = {"dynamic", "longrope"}


def rope_parameters(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """-> (inv_freq [head_dim // 2] fp32, attention_scaling) exactly as Hugging Face computes them."""
    rope_type = (cfg.rope_scaling or {}).get("rope_type", (cfg.rope_scaling or {}).get("type", "default"))
    if rope_type in _UNSUPPORTED:
        raise ValueError(f"rope type {rope_type!r} is not supported (its frequencies depend on the sequence length)")
    if rope_type == "default":
        dim = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0
    hf = AutoConfig.for_model(**cfg.to_hf_dict())
    return ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
