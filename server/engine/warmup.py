"""One warm-up step before the server reports SERVING, so the first real request is as fast as the second.

It runs a base request and a LoRA request (a throwaway rank-4 adapter on every linear layer, written
to a temporary directory and loaded through the normal loader) together through prefill and decode:
the tokenizer and chat template, the quantized matmuls, attention, the SGMV kernels, the pool, the
sampler all run once. Nothing of it remains: the adapter is unloaded and its blocks and pages freed.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import torch

from server.errors import AdapterLoadError
from loader.adapters.lora import module_dims, random_lora, save_adapter
from server.engine.request import GenerateRequest, SamplingParams
from server.engine.structured import StructuredOutput

log = logging.getLogger("tessera.engine")

WARMUP_ADAPTER = "tessera-warmup"


def _write_lora(cfg, path: Path, rank: int = 4) -> None:
    modules = list(module_dims(cfg))
    save_adapter(path, {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": modules,
                        "bias": "none", "task_type": "CAUSAL_LM"},
                 random_lora(cfg, rank, modules, torch.Generator().manual_seed(0), 0.01, 0.01))


def warm_up(engine) -> float:
    """Run the warm-up requests to completion on `engine` (an LLMEngine no other thread steps yet). -> seconds."""
    t0 = time.monotonic()
    params = SamplingParams(max_new_tokens=3)
    requests = [GenerateRequest(prompt="Warm-up: the quick brown fox", sampling=params,
                                request_id="tessera-warmup-base")]
    # structured output: the tokenizer's grammar tables, a compilation and the token bitmask path
    requests.append(GenerateRequest(prompt="Warm-up: JSON", sampling=params, request_id="tessera-warmup-json",
                                    structured=StructuredOutput(json_object=True)))
    if engine.tokenizer.chat_template:
        requests.append(GenerateRequest(messages=[{"role": "user", "content": "Warm up."}], sampling=params,
                                        request_id="tessera-warmup-chat"))
    with tempfile.TemporaryDirectory(prefix="tessera-warmup-") as tmp:
        _write_lora(engine.model_config, Path(tmp))
        try:
            engine.adapters.load(WARMUP_ADAPTER, Path(tmp))
            requests.append(GenerateRequest(prompt="Warm-up: an adapter's tokens", sampling=params,
                                            request_id="tessera-warmup-lora", adapter_id=WARMUP_ADAPTER))
        except AdapterLoadError as exc:  # a pool or host tier too small for even this adapter
            log.warning("warm-up without an adapter: %s", exc)
        try:
            for r in requests:
                engine.add(engine.make_sequence(r))
            failed = []
            while engine.has_work():
                failed += [o for o in engine.step() if o.error]
            if failed:
                raise RuntimeError(f"warm-up requests failed: {[o.error for o in failed]}")
        finally:
            if engine.adapters.get(WARMUP_ADAPTER) is not None:
                engine.adapters.unload(WARMUP_ADAPTER)
    engine.reset_prefix_cache()  # the warm-up's blocks and counts are not the server's
    dt = time.monotonic() - t0
    log.info("warm-up: base and LoRA requests through prefill and decode in %.2fs", dt)
    return dt
