"""load_base_model: a Hugging Face directory, a GGUF file or the embedded default -> one LoadedModel."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from loader.config import ModelConfig
from loader.embedded import default_model_path
from server.errors import ModelLoadError
from loader.gguf_file import load_gguf
from loader.hf_dir import load_hf_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["LoadedModel", "ModelLoadError", "default_model_path", "load_base_model", "load_tokenizer"]

log = logging.getLogger("tessera.loader")


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # HF names; Linear weights (out, in); no lm_head.weight when tied
    tokenizer: "PreTrainedTokenizerBase"
    chat_template: str | None
    source: str  # the directory or .gguf file


def load_tokenizer(path: str | None = None):
    """Only the tokenizer of what load_base_model(path) would load (cheap: no weights are read)."""
    from loader.hf_dir import load_tokenizer as dir_tokenizer
    from loader.tokenizer_cache import gguf_tokenizer

    source = Path(default_model_path() if path is None else path).expanduser()
    if source.is_dir():
        return dir_tokenizer(source)
    if source.is_file() and source.suffix.lower() == ".gguf":
        return gguf_tokenizer(source)
    raise ModelLoadError(f"{source}: expected a Hugging Face model directory or a .gguf file")


def load_base_model(path: str | None = None, dtype: torch.dtype | None = None,
                    keep_quantized: bool = False) -> LoadedModel:
    """None -> the embedded SmolLM2; a directory -> Hugging Face safetensors; a *.gguf file -> GGUF.

    dtype None keeps the checkpoint dtype (fp32 for GGUF, which is dequantized); otherwise floating tensors
    are converted. config.dtype stays the checkpoint's. keep_quantized: GGUF Q4_0/Q4_1/Q8_0 linear weights
    stay packed (kernels.quant.QuantizedWeight, lossless) instead of being dequantized.
    """
    source = Path(default_model_path() if path is None else path).expanduser()
    t0 = time.monotonic()
    if source.is_dir():
        log.info("loading the Hugging Face model directory %s", source)
        cfg, weights, tokenizer = load_hf_dir(source)
    elif source.is_file() and source.suffix.lower() == ".gguf":
        log.info("loading the GGUF file %s (%.1f MiB)", source, source.stat().st_size / 2**20)
        cfg, weights, tokenizer = load_gguf(source, keep_quantized)
    elif source.exists():
        raise ModelLoadError(f"{source}: expected a Hugging Face model directory or a .gguf file")
    else:
        raise ModelLoadError(f"{source}: no such file or directory")
    if dtype is not None:
        weights = {n: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                   for n, t in weights.items()}
    if tokenizer.chat_template is None:
        log.warning("%s has no chat template: only raw prompts can be served", source)
    numel = sum(t.numel() if isinstance(t, torch.Tensor) else t.shape[0] * t.shape[1] for t in weights.values())
    log.info("loaded %s: %s, %d layers, %.1fM parameters, %s, in %.1fs", cfg.name, cfg.architecture,
             cfg.num_hidden_layers, numel / 1e6, str(dtype or cfg.dtype).removeprefix("torch."),
             time.monotonic() - t0)
    return LoadedModel(cfg, weights, tokenizer, tokenizer.chat_template, str(source))
