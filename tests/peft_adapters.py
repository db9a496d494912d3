"""PEFT-made adapters on the real SmolLM2 (the oracle side of adapter tests), cached under .cache/tests.

Each adapter gets non-trivial random weights (PEFT initialises B to zero, which would make every
adapter equal the base model), scaled so that outputs change but stay language-like.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from tests.oracle import CACHE, cache_put, cache_table, hf_smollm2_dir, publish_dir

ADAPTERS = CACHE / "adapters"


def _specs():
    from peft import AdaLoraConfig, LoraConfig

    return {
        "r4-qv": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "r8-all-linear": LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
        "r16-rslora-attn": LoraConfig(r=16, lora_alpha=8, use_rslora=True,
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        "r64-mlp": LoraConfig(r=64, lora_alpha=32, target_modules=["gate_proj", "up_proj", "down_proj"]),
        "dora-r8": LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
        "patterns": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"],
                               rank_pattern={"o_proj": 16, "model.layers.3.self_attn.q_proj": 4},
                               alpha_pattern={"v_proj": 32}),
        "layers-subset": LoraConfig(r=12, lora_alpha=24, target_modules=["k_proj", "up_proj"],
                                    layers_to_transform=[0, 1, 2, 10, 29]),
        "regex-r6": LoraConfig(r=6, lora_alpha=6, target_modules=r".*\.(q_proj|down_proj)"),
        "adalora": AdaLoraConfig(init_r=8, target_r=4, total_step=100, lora_alpha=16,
                                 target_modules=["q_proj", "v_proj"]),
    }


NAMES = ("r4-qv", "r8-all-linear", "r16-rslora-attn", "r64-mlp", "dora-r8",
         "patterns", "layers-subset", "regex-r6", "adalora")


def base_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_smollm2_dir(), dtype=torch.float32).eval()


def _randomize(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5 if "lora_A" in name else 0.3))
            elif "lora_E" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))


def build(name: str, root: Path = ADAPTERS) -> Path:
    return build_peft(name, root, lambda: _specs()[name], lambda model: _randomize(model, seed=sum(map(ord, name))))


def build_peft(name: str, root: Path, spec, randomize) -> Path:
    """root/name made once: get_peft_model(base, spec()), randomize(model), save_pretrained (atomically)."""
    out = root / name
    if (out / "adapter_model.safetensors").exists():
        return out
    from peft import get_peft_model

    model = get_peft_model(base_model(), spec())
    randomize(model)
    return publish_dir(out, model.save_pretrained)


def build_all(root: Path = ADAPTERS) -> Path:
    for name in NAMES:
        build(name, root)
    return root


@functools.lru_cache(maxsize=None)
def peft_greedy(name: str | None, prompt_ids: tuple[int, ...], max_new_tokens: int) -> list[int]:
    """PEFT's generate with one adapter alone (None = base), greedy, cached on disk."""
    cache = CACHE / "peft_oracle.json"
    key = f"{name}|{max_new_tokens}|{','.join(map(str, prompt_ids))}"
    table = cache_table(cache)
    if key in table:
        return table[key]
    from peft import PeftModel

    model = base_model()
    if name is not None:
        model = PeftModel.from_pretrained(model, build(name)).eval()
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                             dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=2)
    ids = out[0, len(prompt_ids):].tolist()
    cache_put(cache, key, ids)
    return ids


def peft_greedy_on_weights(linear_weight, name: str | None, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """PEFT's greedy generate on SmolLM2 whose linear weights are replaced by linear_weight(layer, module)
    (e.g. the dequantized weights a quantized engine serves)."""
    from peft import PeftModel

    model = base_model_on_weights(linear_weight)
    if name is not None:
        model = PeftModel.from_pretrained(model, build(name)).eval()
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                             dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=2)
    return out[0, len(prompt_ids):].tolist()


def base_model_on_weights(linear_weight):
    """The HF SmolLM2 with its linear weights replaced by linear_weight(layer, module)."""
    model = base_model()
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for block, mods in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                ("mlp", ("gate_proj", "up_proj", "down_proj"))):
                for mod in mods:
                    getattr(getattr(layer, block), mod).weight.copy_(linear_weight(i, mod))
    return model
