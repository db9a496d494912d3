"""A Hugging Face model directory: config.json (+ generation_config.json), safetensors weights, tokenizer."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from loader.config import DTYPES, ModelConfig, eos_list
from server.errors import ModelLoadError
from loader.names import expected_shapes
from loader.safetensors_files import read_tensors, weight_files

log = logging.getLogger("tessera.loader")

def load_hf_dir(path: Path):
    """-> (ModelConfig, weights with HF names in the checkpoint dtype, tokenizer)."""
    cfg = read_config(path)
    files = weight_files(path)
    weights = read_tensors(files, expected_shapes(cfg))
    dtype = str(weights["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ModelLoadError(f"{files[0]}: weights are {dtype}; supported dtypes: {', '.join(DTYPES)}")
    cfg = dataclasses.replace(cfg, dtype=dtype)
    return cfg, weights, load_tokenizer(path)

def read_config(path: Path) -> ModelConfig:
    """config.json (+ the EOS ids of generation_config.json) -> ModelConfig; problems name the file."""
    config_file = path / "config.json"
    if not config_file.is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f" (to load a GGUF file, pass its path: {path / ggufs[0]})" if ggufs else ""
        raise ModelLoadError(f"{path} has no config.json; a Hugging Face model directory needs one{hint}")
    d = _read_json(config_file)
    if d.get("quantization_config"):
        method = d["quantization_config"].get("quant_method", "?")
        raise ModelLoadError(f"{config_file}: quantized checkpoints ({method}) are not supported; use the "
                             f"unquantized model or a GGUF file")
    try:
        cfg = ModelConfig.from_hf_dict(d, name=path.name)
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{config_file}: {e}") from e
    _warn_sliding_window(d, cfg)
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        extra = eos_list(_read_json(gen_file).get("eos_token_id"))
        eos = list(dict.fromkeys(cfg.eos_token_ids + extra))
        try:
            cfg = dataclasses.replace(cfg, eos_token_ids=eos)
        except ValueError as e:
            raise ModelLoadError(f"{gen_file}: {e}") from e
    return cfg

def load_tokenizer(path: Path):
    """The directory's own tokenizer (tokenizer.json / tokenizer_config.json / chat template files)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a missing/broken tokenizer
        raise ModelLoadError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {e})") from e

def _read_json(file: Path) -> dict:
    try:
        d = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelLoadError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise ModelLoadError(f"{file}: expected a JSON object, got {type(d).__name__}")
    return d

def _warn_sliding_window(d: dict, cfg: ModelConfig) -> None:
    # Mistral v0.1 / some Qwen2 configs limit attention to a window; the server attends to the whole context.
    window = d.get("sliding_window")
    used = d.get("use_sliding_window", cfg.architecture == "mistral")
    if used and window and window < cfg.max_position_embeddings:
        log.warning("%s: sliding_window=%d is ignored (full attention); outputs past %d tokens differ from the "
                    "reference", cfg.name, window, window)
