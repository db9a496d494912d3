"""A GGUF file: metadata -> ModelConfig, tensors -> HF-named fp32 weights, tokenizer (cached conversion)."""
from __future__ import annotations

from pathlib import Path

from gguf import GGUFReader

from server.errors import ModelLoadError
from loader.gguf_config import config_from_gguf, field
from loader.gguf_tensors import load_gguf_weights
from loader.tokenizer_cache import gguf_tokenizer


def open_gguf(path: Path) -> GGUFReader:
    """Parse the header and tensor index (the data stays memory-mapped)."""
    try:
        return GGUFReader(path)
    except Exception as e:  # a foreign or truncated file fails anywhere in the parser (ValueError, IndexError...)
        raise ModelLoadError(f"{path}: not a valid GGUF file ({type(e).__name__}: {e})") from e


def load_gguf(path: Path, keep_quantized: bool = False):
    """-> (ModelConfig, weights with HF names (fp32, or packed QuantizedWeight for Q4_0/Q4_1/Q8_0 linear
    weights with keep_quantized), tokenizer with the GGUF's chat template)."""
    reader = open_gguf(path)
    cfg = config_from_gguf(reader, path)
    weights = load_gguf_weights(reader, cfg, path, keep_quantized)
    tokenizer = gguf_tokenizer(path)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = field(reader, "tokenizer.chat_template", None)
    return cfg, weights, tokenizer
