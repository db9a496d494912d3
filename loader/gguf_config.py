"""GGUF metadata -> ModelConfig (llama.cpp key names, mapped as transformers' GGUF integration maps them)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from gguf import GGUFReader

from loader.config import ModelConfig
from server.errors import ModelLoadError

GGUF_ARCHITECTURES = ("llama", "qwen2")  # llama.cpp writes Mistral models as "llama"
_REQUIRED = object()


def field(reader: GGUFReader, key: str, default: Any = _REQUIRED, path: Path | None = None) -> Any:
    """The Python value of a metadata key (str, int, float, bool or list); `default` when absent."""
    f = reader.fields.get(key)
    if f is None:
        if default is _REQUIRED:
            raise ModelLoadError(f"{path}: GGUF metadata lacks the key {key!r}")
        return default
    return f.contents()


def config_from_gguf(reader: GGUFReader, path: Path) -> ModelConfig:
    """Read the architecture from the metadata; tying and biases from which tensors exist."""
    arch = field(reader, "general.architecture", path=path)
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                             f"{', '.join(GGUF_ARCHITECTURES)}")
    tensors = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise ModelLoadError(f"{path}: has per-frequency rope factors (rope_freqs.weight, Llama 3.1+ rope "
                             f"scaling), which are not supported from GGUF yet; load the Hugging Face directory")

    def key(name: str, default: Any = _REQUIRED) -> Any:
        value = field(reader, f"{arch}.{name}", default, path)
        if isinstance(value, list):
            raise ModelLoadError(f"{path}: {arch}.{name} varies per layer ({value[:4]}...), which is not supported")
        return value

    heads, hidden = key("attention.head_count"), key("embedding_length")
    head_dim = key("attention.key_length", hidden // heads if heads else 0)
    rope_dims = key("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ModelLoadError(f"{path}: rope covers {rope_dims} of {head_dim} head dims; partial rotary embeddings "
                             f"are not supported")
    context = key("context_length")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = key("vocab_size", len(tokens.data) if tokens is not None else None)
    if vocab is None:
        raise ModelLoadError(f"{path}: GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    eos = [field(reader, f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot", "eom")]
    try:
        return ModelConfig(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=key("feed_forward_length"),
            num_hidden_layers=key("block_count"),
            num_attention_heads=heads,
            num_key_value_heads=key("attention.head_count_kv", heads),
            head_dim=head_dim,
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scaling=_rope_scaling(key, context, path),
            max_position_embeddings=context,
            tie_word_embeddings="output.weight" not in tensors,
            attention_bias="blk.0.attn_q.bias" in tensors,
            mlp_bias="blk.0.ffn_up.bias" in tensors,
            bos_token_id=field(reader, "tokenizer.ggml.bos_token_id", None),
            eos_token_ids=list(dict.fromkeys(t for t in eos if t is not None)),
            pad_token_id=field(reader, "tokenizer.ggml.padding_token_id", None),
            dtype="float32",  # every tensor is dequantized to fp32
            name=model_name(path),
        )
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from e


def _rope_scaling(key, context: int, path: Path) -> dict | None:
    """llama.cpp rope.scaling.* keys -> a transformers rope_scaling dict (None for plain rope)."""
    kind = key("rope.scaling.type", None)
    factor = key("rope.scaling.factor", None)
    if kind is None and key("rope.scale_linear", None) is not None:  # the pre-2023 key
        kind, factor = "linear", key("rope.scale_linear")
    if kind in (None, "none") or (kind == "linear" and factor in (None, 0.0, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(factor),
                   "original_max_position_embeddings": key("rope.scaling.original_context_length", context)}
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if (value := key(f"rope.scaling.{gguf_key}", None)) is not None:
                scaling[hf_key] = float(value)
        return scaling
    raise ModelLoadError(f"{path}: rope scaling type {kind!r} is not supported (supported: none, linear, yarn)")


_QUANT_SUFFIX = re.compile(r"[.-](?:I?Q\d\w*|F16|F32|BF16)$", re.IGNORECASE)


def model_name(path: Path) -> str:
    """The file's name without its quantization tag: SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct.
    (general.name is often the training run's label, e.g. "Smollm2 135M 8k Lc100K Mix1 Ep2".)"""
    return _QUANT_SUFFIX.sub("", path.stem) or path.stem
