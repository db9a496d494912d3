"""The base model as read from disk, once per test session: every engine a test builds over the same model
file shares the loaded weights and tokenizer (reading and parsing the GGUF is most of an engine's start-up).
Engines never modify what they were built from (LlamaModel copies the weights into its own modules)."""
from __future__ import annotations

import functools

from loader.base import LoadedModel, load_base_model
from server.config import EngineConfig
from server.engine.engine import LLMEngine


@functools.cache
def loaded(model: str | None = None, keep_quantized: bool = True) -> LoadedModel:
    return load_base_model(model, keep_quantized=keep_quantized)


def engine(cfg: EngineConfig) -> LLMEngine:
    """LLMEngine.from_config(cfg), over the session's copy of the model."""
    return LLMEngine(cfg, loaded(cfg.model, cfg.quantize != "none"))
