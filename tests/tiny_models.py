"""A tiny random-weight Llama and tiny adapters of every kind written the way PEFT saves them: fast tests of the
engine and the adapter loaders without the real model. `CharTokenizer` decodes ids to letters (the engine's
detokenizer needs something to call; these tests compare token ids)."""
from __future__ import annotations

from pathlib import Path

import torch

from loader.base import LoadedModel
from loader.config import ModelConfig
from loader.adapters.lora import module_dims, random_lora, save_adapter
from loader.names import expected_shapes

PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
ALL_LINEAR = list(PARENT)
CFG = ModelConfig(architecture="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=1e4,
                  rope_scaling=None, max_position_embeddings=512, tie_word_embeddings=True, attention_bias=False,
                  mlp_bias=False, bos_token_id=1, eos_token_ids=[2], name="tiny")
KV_DIM = CFG.num_key_value_heads * CFG.head_dim


class CharTokenizer:
    chat_template = None

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) -> str:
        return "".join(chr(0x41 + i % 58) for i in ids)


def tiny_loaded(tokenizer=None, scale: float = 0.05) -> LoadedModel:
    g = torch.Generator().manual_seed(0)
    weights = {n: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * scale)
               for n, s in expected_shapes(CFG).items()}
    return LoadedModel(CFG, weights, tokenizer=tokenizer, chat_template=None, source="tiny")


# -- tiny adapters, written the way PEFT saves them --------------------------------------------------------------
def lora(path: Path, rank: int = 2, targets=("q_proj", "v_proj"), seed: int = 0, **config) -> Path:
    tensors = random_lora(CFG, rank, targets, torch.Generator().manual_seed(seed), 0.1, 0.1)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
           "target_modules": list(targets)}
    return save_adapter(path, {**cfg, **config}, tensors)


def prompt(path: Path, nvt: int = 4, kind: str = "PROMPT_TUNING", **config) -> Path:
    width = CFG.num_hidden_layers * 2 * KV_DIM if kind == "PREFIX_TUNING" else CFG.hidden_size
    cfg = {"peft_type": kind, "task_type": "CAUSAL_LM", "num_virtual_tokens": nvt,
           "token_dim": KV_DIM if kind == "PREFIX_TUNING" else CFG.hidden_size, "num_layers": CFG.num_hidden_layers}
    tensors = {"prompt_embeddings": torch.randn(nvt, width) * 0.1}
    if kind == "MULTITASK_PROMPT_TUNING":
        cfg.update(num_tasks=3, num_ranks=2)
        tensors.update(prefix_task_cols=torch.randn(3, nvt, 2), prefix_task_rows=torch.randn(3, 2, CFG.hidden_size))
    return save_adapter(path, {**cfg, **config}, tensors)


def ia3(path: Path, **config) -> Path:
    dims = module_dims(CFG)
    tensors = {}
    for layer in range(CFG.num_hidden_layers):
        for mod in ("k_proj", "v_proj", "down_proj"):
            fan_in, fan_out = dims[mod]
            shape = (1, fan_in) if mod == "down_proj" else (fan_out, 1)
            tensors[f"base_model.model.model.layers.{layer}.{PARENT[mod]}.{mod}.ia3_l"] = 1 + 0.1 * torch.randn(shape)
    cfg = {"peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": ["k_proj", "v_proj", "down_proj"],
           "feedforward_modules": ["down_proj"]}
    return save_adapter(path, {**cfg, **config}, tensors)


def adaption(path: Path, **config) -> Path:
    top = CFG.num_hidden_layers - 1
    tensors = {f"base_model.model.model.layers.{top}.self_attn.adaption_prompt": torch.randn(1, 3, CFG.hidden_size),
               f"base_model.model.model.layers.{top}.self_attn.adaption_gate": torch.tensor([0.5])}
    cfg = {"peft_type": "ADAPTION_PROMPT", "task_type": "CAUSAL_LM", "adapter_len": 3, "adapter_layers": 1,
           "target_modules": "self_attn"}
    return save_adapter(path, {**cfg, **config}, tensors)


def run_waves(engine, waves: list, check=None) -> dict[str, list[int]]:
    """Each wave of GenerateRequests is added once the previous one finished; `check(engine)` after every step
    -> request id -> generated token ids."""
    out: dict[str, list[int]] = {}
    for wave in waves:
        for r in wave:
            engine.add(engine.make_sequence(r))
            out[r.request_id] = []
        while engine.has_work():
            for o in engine.step():
                out[o.request_id] += o.token_ids
            if check:
                check(engine)
    return out
