"""PEFT-made prompt-learning, IA3 and LLaMA-Adapter adapters on the real SmolLM2 (oracle side), cached
under .cache/tests/adapters_prompt.

PEFT initialises these kinds to no-ops or to arbitrary scales (prefix/p-tuning embeddings ~N(0,1), IA3
vectors = 1, adaption gate = 0), so each adapter gets weights derived from the real model (seed-text KV,
embedding rows, attention inputs) plus noise: outputs change but stay language-like.

FACTS (peft 0.21.2, transformers 5.23; SmolLM2-135M: 30 layers, hidden 576, 9 query heads, 3 KV heads,
head_dim 64, RoPE theta 1e5, tied lm_head). Each was checked by a from-scratch fp32 Llama written from the
safetensors (plain torch, no transformers/PEFT code) whose greedy loop with its own KV cache reproduced
`PeftModel.generate(..., output_logits=True)` at every step (prefill + 7 decode steps, 2 prompts): same
tokens, max |logit diff| in brackets (the base model alone: 3.4e-5). A wrong variant of each claim (noted
"wrong: ...") gave different tokens or logit diffs >= 1.4.

Files: `adapter_config.json` + `adapter_model.safetensors` (fp32, metadata {"format": "pt"}) + README.md.
`peft_type`: PREFIX_TUNING, PROMPT_TUNING, P_TUNING, MULTITASK_PROMPT_TUNING, IA3, ADAPTION_PROMPT.

Prefix tuning: "prefix" (nvt 10) [4.0e-5], "prefix-proj" (nvt 12) [6.3e-5]
- One key `prompt_embeddings`, shape (nvt, num_layers*2*token_dim) = (nvt, 30*2*192 = 11520). With
  `prefix_projection=True` the stored tensor is the FINAL table (embedding -> Linear -> tanh -> Linear is
  run at save time; the encoder weights are not saved; on load `inference_mode=True` makes the table a
  plain embedding), so both variants are served identically. Config: token_dim=192 (= kv_heads*head_dim),
  num_attention_heads=3 (= kv_heads), num_layers=30; `prefix_projection`/`encoder_hidden_size` are
  informational.
- Row t viewed as (2*num_layers, kv_heads, head_dim): index 2l = layer l key, 2l+1 = layer l value. Keys
  are used as-is: never RoPE-rotated at use time (wrong: rotating them at positions 0..nvt-1, diff 24).
- generate(): the cache starts with the nvt prefix entries in every layer; attention mask = nvt ones in
  front (every real token, prompt and generated, attends all nvt entries); real token i is at position
  nvt+i (PEFT adds nvt to cache_position at prefill) and decode continues at nvt+L+t (wrong: positions
  i, diff 19-27). With left padding PEFT uses cumsum(mask)-1+nvt, i.e. still nvt+i per real token.
- A prefix is thus a shared, pre-filled KV prefix of length nvt with position offset nvt. It is not the KV
  of any token sequence (no k_proj/v_proj involved).

Prompt tuning "prompt-text" (nvt 8) [4.3e-5] and P-tuning "p-tuning" (nvt 6) [8.6e-5]
- One key `prompt_embeddings`, shape (nvt, hidden=576). For P-tuning the stored tensor is the OUTPUT of
  the MLP encoder (embedding -> Linear(576,h) ReLU Linear(h,h) ReLU Linear(h,576)), computed at save time;
  encoder weights are not saved. Both kinds are therefore served identically. TEXT-init config keys
  (`prompt_tuning_init`, `prompt_tuning_init_text`, `tokenizer_name_or_path`) are init-only.
- generate(): inputs_embeds = [prompt_embeddings ; embed(input_ids)] (virtual rows enter layer 0 exactly
  like token embeddings, no scaling), mask = nvt ones in front, positions 0 .. nvt+L-1, i.e. real token i
  at nvt+i; decode at nvt+L+t. Logits are never taken for virtual rows.
- By causality the virtual tokens' KV equals a standalone prefill over the nvt embeddings at positions
  0..nvt-1: serving from that precomputed KV (a prefix of length nvt, real tokens at nvt+i) matched PEFT
  [7.7e-5 over prompt-text, p-tuning, multitask] (wrong: real tokens at 0+i after it, diff 30).
- PEFT quirk, batch only: PEFT drops position_ids for these kinds, so a LEFT-PADDED row's real tokens sit
  at nvt+pad+i (checked: 3.4e-5 for nvt+pad+i, 21.9 for nvt+i). The oracle here is one unpadded prompt,
  where this is nvt+i.

Multitask prompt tuning "multitask" (nvt 6, 3 tasks, rank 2) [tasks 0/1/2: 6.9e-5 / 5.3e-5 / 5.7e-5]
- Keys `prompt_embeddings` (nvt, 576), `prefix_task_cols` (num_tasks, nvt, num_ranks),
  `prefix_task_rows` (num_tasks, num_ranks, 576).
- Virtual embeddings for task t = prompt_embeddings * (cols[t] @ rows[t]) (ELEMENTWISE product with the
  rank-num_ranks (nvt, 576) matrix); then exactly as prompt tuning (wrong: raw prompt_embeddings, diff
  3.5-33). generate() needs `task_ids` (None: ValueError "task_ids cannot be None"; 3 or -1:
  IndexError from index_select).

IA3 "ia3" (k_proj, v_proj, down_proj; ff = down_proj) [8.3e-5], "ia3-attn" (q_proj, o_proj, up_proj;
ff = up_proj) [7.0e-5]
- Keys `base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.ia3_l`, `...mlp.{up,down}_proj.ia3_l`
  (no `.weight` suffix), every layer. Non-feedforward module: shape (out, 1), the output is scaled,
  y = (W x) * l. Feedforward module: shape (1, in), the input is scaled, y = W (x * l). Input scaling of
  up_proj does NOT touch gate_proj: a fused gate|up matmul must compute gate(x) and up(x * l) (wrong:
  scaling gate's input too, diff 37).
- From the source only (SmolLM2 has no biases, so not exercised): with a bias, output scaling is
  (W x + b) * l (bias scaled; merge scales it too), input scaling is W (x * l) + b (bias not).
  `feedforward_modules` must be a subset of `target_modules` (config check); ff matching is
  `key.endswith(name)` for a list (no dot boundary), regex fullmatch for a string.

LLaMA-Adapter "adaption" (adapter_len 6, adapter_layers 4, gates 0.83/0.70/0.56/0.72) [4.1e-5]
- PEFT 0.21 works on SmolLM2 (Llama with GQA): nothing failed.
- Keys `base_model.model.model.layers.{i}.self_attn.adaption_prompt` (1, adapter_len, 576) and
  `...self_attn.adaption_gate` (1,), only for the TOP `adapter_layers` layers (i = 26..29 here). Config:
  `target_modules: "self_attn"`, `adapter_len`, `adapter_layers`.
- Per adapted layer, h = the attention input (after input_layernorm), q = RoPE(q_proj(h)) at the token's
  position (the layer's own queries), P = adaption_prompt[0] (used raw: no norm):
  K = k_proj(P), V = v_proj(P), NO RoPE on K (wrong: RoPE at 0..len-1, diff 2.9), viewed
  (len, kv_heads, head_dim) and repeat_interleave'd to the 9 query heads (query head j uses KV head j//3);
  s = softmax(q K^T / sqrt(head_dim)) over the adapter_len keys ONLY (its own softmax, upcast to fp32
  per the source, no mask, not joined with the normal attention); adapter_out = o_proj(concat_heads(gate * s @ V)) with the raw
  scalar gate shared by all heads (wrong: tanh(gate), diff 1.4); attention output = normal attention
  output (after o_proj) + adapter_out, before the residual add.
- No cache entries and no position offset: real tokens stay at positions 0..L-1; K/V of the prompt are
  constant per adapter and can be precomputed at load (layer l: k_proj/v_proj of that layer).

Mixed batches: PEFT applies prompt-learning/IA3/adaption adapters to every row of a batch, so the oracle
here is one adapter alone per generate call.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from tests.oracle import CACHE, cache_put, cache_table, hf_smollm2_dir
from tests.peft_adapters import base_model, build_peft

ADAPTERS = CACHE / "adapters_prompt"
NAMES = ("prefix", "prefix-proj", "prompt-text", "p-tuning", "multitask", "ia3", "ia3-attn", "adaption")
NUM_TASKS = 3
VERSION = 1  # bump when the randomization changes (part of the disk cache key)
# Real text whose model states seed the adapters (prefix KV, prompt rows, adaption prompts).
SEED_TEXT = ("Ahoy matey! Ye be talkin' to a salty old pirate captain who sails the seven seas, "
             "hunts for buried treasure and answers every question with a hearty arr.")


def _specs():
    from peft import (AdaptionPromptConfig, IA3Config, MultitaskPromptTuningConfig, PrefixTuningConfig,
                      PromptEncoderConfig, PromptTuningConfig)

    return {
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10),
        "prefix-proj": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=12, prefix_projection=True,
                                          encoder_hidden_size=64),
        "prompt-text": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, prompt_tuning_init="TEXT",
                                          prompt_tuning_init_text="Answer like a pirate.",
                                          tokenizer_name_or_path=str(hf_smollm2_dir())),
        "p-tuning": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, encoder_hidden_size=64),
        "multitask": MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, num_tasks=NUM_TASKS,
                                                 num_ranks=2, prompt_tuning_init="RANDOM"),
        "ia3": IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                         feedforward_modules=["down_proj"]),
        "ia3-attn": IA3Config(task_type="CAUSAL_LM", target_modules=["q_proj", "o_proj", "up_proj"],
                              feedforward_modules=["up_proj"]),
        "adaption": AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=6, adapter_layers=4),
    }


@functools.lru_cache(maxsize=1)
def _seed_states():
    """Real-model states on SEED_TEXT: token ids, per-layer (post-RoPE) keys/values, attention inputs."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(hf_smollm2_dir())(SEED_TEXT)["input_ids"]
    model = base_model()
    attn_in = {}
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs, i=i: attn_in.__setitem__(i, kwargs["hidden_states"][0].clone()), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
    for h in hooks:
        h.remove()
    cache = out.past_key_values
    keys = [cache.layers[i].keys[0].transpose(0, 1).clone() for i in range(len(model.model.layers))]  # (T, kv, hd)
    values = [cache.layers[i].values[0].transpose(0, 1).clone() for i in range(len(model.model.layers))]
    return ids, keys, values, attn_in, model.model.embed_tokens.weight.detach().clone()


def _prefix_table(nvt: int, g: torch.Generator) -> torch.Tensor:
    """(nvt, L*2*kv*hd): the real KV of the seed text's first nvt tokens + 0.5*std noise (per layer/channel)."""
    _, keys, values, _, _ = _seed_states()
    rows = []
    for k, v in zip(keys, values):
        for t in (k, v):
            rows.append(t[:nvt] + 0.5 * t.std(0, keepdim=True) * torch.randn(t[:nvt].shape, generator=g))
    return torch.stack(rows, 1).reshape(nvt, -1)  # (nvt, 2L, kv, hd) -> flat, order L0.k, L0.v, L1.k, ...


def _randomize(model, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids, keys, values, attn_in, emb = _seed_states()
    emb_std = emb.std()
    with torch.no_grad():
        if name in ("prefix", "prefix-proj", "prompt-text", "p-tuning", "multitask"):
            enc = model.prompt_encoder["default"]
        if name == "prefix":
            enc.embedding.weight.copy_(_prefix_table(enc.embedding.weight.shape[0], g))
        elif name == "prefix-proj":
            # bias = the seed KV's mean over the nvt tokens; the tanh MLP adds variation ~ the seed KV's spread.
            nvt = enc.embedding.weight.shape[0]
            table = _prefix_table(nvt, g)
            mean = table.mean(0)
            spread = table.std(0)
            enc.embedding.weight.copy_(torch.randn(enc.embedding.weight.shape, generator=g))
            first, last = enc.transform[0], enc.transform[2]
            first.weight.copy_(torch.randn(first.weight.shape, generator=g) / first.in_features ** 0.5)
            first.bias.zero_()
            last.weight.copy_(torch.randn(last.weight.shape, generator=g) * spread[:, None]
                              * 1.5 / last.in_features ** 0.5)
            last.bias.copy_(mean)
        elif name == "prompt-text":  # TEXT init = embedding rows of the text; add noise
            w = enc.embedding.weight
            w.add_(0.3 * emb_std * torch.randn(w.shape, generator=g))
        elif name == "p-tuning":
            # embedding = seed token rows; MLP output = mean seed row + structured variation at embedding scale
            nvt = enc.embedding.weight.shape[0]
            rows = emb[torch.tensor(ids[:nvt])]
            enc.embedding.weight.copy_(rows)
            layers = [m for m in enc.mlp_head if isinstance(m, torch.nn.Linear)]
            for lin in layers[:-1]:
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * (2.0 / lin.in_features) ** 0.5)
                lin.bias.zero_()
            layers[0].weight.div_(emb_std)  # its inputs are ~emb_std, not ~1
            last = layers[-1]
            last.weight.copy_(torch.randn(last.weight.shape, generator=g) * emb_std / last.in_features ** 0.5)
            last.bias.copy_(rows.mean(0))
        elif name == "multitask":
            nvt = enc.embedding.weight.shape[0]
            enc.embedding.weight.copy_(emb[torch.tensor(ids[3:3 + nvt])]
                                       + 0.2 * emb_std * torch.randn((nvt, emb.shape[1]), generator=g))
            # cols[t] @ rows[t] = 1 + a_t b_t^T: rank 0 gives all-ones, rank 1 a per-task multiplicative pattern
            cols, rows_ = enc.prefix_task_cols, enc.prefix_task_rows
            cols[:, :, 0] = 1.0
            rows_[:, 0, :] = 1.0
            cols[:, :, 1:] = torch.randn(cols[:, :, 1:].shape, generator=g)
            rows_[:, 1:, :] = 0.8 * torch.randn(rows_[:, 1:, :].shape, generator=g)
        elif name in ("ia3", "ia3-attn"):
            for pname, p in model.named_parameters():
                if "ia3_l" in pname:
                    p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        elif name == "adaption":
            layers = model.base_model.model.model.layers
            for i, layer in enumerate(layers):
                attn = layer.self_attn
                if not hasattr(attn, "adaption_prompt"):
                    continue
                h = attn_in[i]  # (T, hidden): real attention inputs at this layer
                n = attn.adaption_prompt.shape[1]
                pick = torch.randperm(h.shape[0] - 1, generator=g)[:n] + 1  # skip the attention-sink token 0
                attn.adaption_prompt.copy_((h[pick] + 0.3 * h.std() * torch.randn((n, h.shape[1]), generator=g))[None])
                attn.adaption_gate.fill_(0.5 + 0.5 * torch.rand((), generator=g).item())


def build(name: str, root: Path = ADAPTERS) -> Path:
    return build_peft(name, root, lambda: _specs()[name], lambda model: _randomize(model, name, seed=sum(map(ord, name))))


def build_all(root: Path = ADAPTERS) -> Path:
    for name in NAMES:
        build(name, root)
    return root


def peft_model(name: str | None):
    """PeftModel.from_pretrained(base, build(name)) (or the base model for None), eval mode."""
    from peft import PeftModel

    model = base_model()
    if name is not None:
        model = PeftModel.from_pretrained(model, build(name)).eval()
    return model


@functools.lru_cache(maxsize=None)
def peft_greedy(name: str | None, prompt_ids: tuple[int, ...], max_new_tokens: int,
                task_id: int | None = None) -> list[int]:
    """PEFT's generate with one adapter alone (None = base), greedy, cached on disk. task_id: multitask only."""
    cache = CACHE / "peft_prompt_oracle.json"
    key = f"v{VERSION}|{name}|{task_id}|{max_new_tokens}|{','.join(map(str, prompt_ids))}"
    table = cache_table(cache)
    if key in table:
        return table[key]
    model = peft_model(name)
    kwargs = {} if task_id is None else {"task_ids": torch.tensor([task_id])}
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                             dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=2,
                             **kwargs)
    ids = out[0, len(prompt_ids):].tolist()
    cache_put(cache, key, ids)
    return ids
