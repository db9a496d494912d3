"""LLaMA-Adapter (PEFT `ADAPTION_PROMPT`): a gated prompt attended to by the top layers' queries.

Stored per adapted layer i (the top `adapter_layers`): `...layers.{i}.self_attn.adaption_prompt`
[1, len, hidden] and `...adaption_gate` [1]. PEFT's math for Llama (tuners/adaption_prompt/layer.py),
added to the layer's attention output after o_proj:
    K = k_proj(prompt), V = v_proj(prompt)      [len, kv_heads, D], no RoPE, repeated over GQA groups
    p = gate * softmax(q @ K.T / sqrt(D))       q: the layer's rotated queries; softmax in fp32, separate
    out += o_proj(p @ V)                        (o_proj applied again, bias included)
K and V depend only on the adapter and the served weights, so they are computed once at load.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loader.adapters.adapter_config import ConfigProblems
from server.errors import AdapterLoadError
from loader.config import ModelConfig
from loader.adapters.lora import read_adapter_config, read_safetensors

_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.self_attn\.(adaption_prompt|adaption_gate)$")
_KNOWN = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "adapter_len",
          "adapter_layers", "target_modules", "auto_mapping", "peft_version", "modules_to_save"}


@dataclass
class AdaptionAdapter:
    adapter_id: str
    path: Path
    adapter_len: int
    kind: str = "adaption_prompt"
    # layer -> (K [len, heads, D], V [len, heads, D], gate [1]) in the model's dtype/device
    layers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.adapter_len

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kvg in self.layers.values() for t in kvg)


def load_adaption_prompt(adapter_id: str, path: Path, model_cfg: ModelConfig, model) -> AdaptionAdapter:
    """model: the served LlamaModel (its k/v projections turn the prompt into keys and values)."""
    d = read_adapter_config(path)
    name = path.name
    p = ConfigProblems(f"{name}/adapter_config.json")
    p.unknown_fields(d, _KNOWN)
    if p.string(d, "target_modules") not in (None, "self_attn"):
        p.unserved(f"target_modules={d['target_modules']!r} (only self_attn is served)")
    if d.get("modules_to_save"):
        p.unserved("modules_to_save is not supported")
    for field in ("adapter_len", "adapter_layers"):
        if d.get(field) is None:
            p.bad(field, "missing")
    n, top = p.integer(d, "adapter_len"), p.integer(d, "adapter_layers")
    p.raise_any()
    if top > model_cfg.num_hidden_layers:
        raise AdapterLoadError("incompatible", f"{name}: adapter_layers: {top}, but the base model has "
                               f"{model_cfg.num_hidden_layers} layers (made for another base model?)")
    parts: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in read_safetensors(path).items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterLoadError("invalid", f"{name}: unexpected tensor {key}")
        parts.setdefault(int(m.group(1)), {})[m.group(2)] = t.float()
    want_layers = set(range(model_cfg.num_hidden_layers - top, model_cfg.num_hidden_layers))
    if set(parts) != want_layers:
        raise AdapterLoadError("incompatible", f"{name}: tensors for layers {sorted(parts)}, expected the top {top} "
                               f"of {model_cfg.num_hidden_layers} (made for another base model?)")
    heads, kvh, hd = model_cfg.num_attention_heads, model_cfg.num_key_value_heads, model_cfg.head_dim
    out = AdaptionAdapter(adapter_id, path, n)
    with torch.no_grad():
        for layer, p in sorted(parts.items()):
            prompt, gate = p.get("adaption_prompt"), p.get("adaption_gate")
            if prompt is None or gate is None or tuple(prompt.shape) != (1, n, model_cfg.hidden_size) \
                    or gate.numel() != 1:
                raise AdapterLoadError("invalid", f"{name}: layer {layer} needs adaption_prompt (1, {n}, "
                                       f"{model_cfg.hidden_size}) and adaption_gate (1,)")
            if not (torch.isfinite(prompt).all() and torch.isfinite(gate).all()):
                raise AdapterLoadError("invalid", f"{name}: NaN or infinite values")
            lin = model.linear(layer, "k_proj")  # the fused q/k/v projection
            kv = lin.matmul(prompt[0].to(model.device, model.dtype))
            (k0, k1), (v0, v1) = lin.slice_offsets["k_proj"], lin.slice_offsets["v_proj"]
            k = kv[:, k0:k1].reshape(n, kvh, hd).repeat_interleave(heads // kvh, dim=1)
            v = kv[:, v0:v1].reshape(n, kvh, hd).repeat_interleave(heads // kvh, dim=1)
            out.layers[layer] = (k, v, gate.to(model.device, model.dtype).reshape(1))
    return out
