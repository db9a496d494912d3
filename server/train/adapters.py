"""Trainable adapters for the served model: the same LlamaModel, base frozen, only these parameters learn.

- `TrainableLora` (LoRA, rsLoRA, DoRA; QLoRA = the same on a quantized base) plugs into the model's
  linear seam as its AdapterApplier, exactly where the server's pool adds served adapters.
- `TrainablePrefix` gives each layer a learned key/value prefix (prefix tuning, with or without the
  reparameterization MLP); `TrainablePrompt` prepends learned input embeddings (prompt tuning).
Each exports `peft_config()` and `peft_tensors()`: what PEFT saves (../shared/PEFT_FORMAT.md).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loader.adapters.adapter_config import LINEAR_MODULES, LoraAdapterConfig
from loader.adapters.lora import _PARENT

# PEFT's default LoRA targets per architecture (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
DEFAULT_TARGETS = {"llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"]}


def module_name(layer: int, mod: str) -> str:
    return f"model.layers.{layer}.{_PARENT[mod]}.{mod}"


def _target_of(peft_key: str) -> tuple[int, str]:
    parts = peft_key.split(".")  # base_model.model.model.layers.{i}.{self_attn|mlp}.{mod}....
    return int(parts[4]), parts[6]


class TrainableLora(nn.Module):
    """y[:, slice] += s * B(A(dropout(x))) per targeted module; DoRA rescales by m / ||W + s B A||."""

    kind = "lora"

    def __init__(self, model, *, r: int, lora_alpha: float, lora_dropout: float, target_modules,
                 use_rslora: bool, use_dora: bool, layers_to_transform: list[int] | None, base_name: str,
                 generator: torch.Generator):
        super().__init__()
        cfg = model.config
        self.config_dict = dict(
            peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_name, r=r, lora_alpha=lora_alpha,
            lora_dropout=lora_dropout, target_modules=target_modules or DEFAULT_TARGETS[cfg.architecture],
            use_rslora=use_rslora, use_dora=use_dora, layers_to_transform=layers_to_transform, bias="none",
            fan_in_fan_out=False, init_lora_weights=True, inference_mode=True, modules_to_save=None,
            rank_pattern={}, alpha_pattern={})
        parsed = LoraAdapterConfig.from_dict(self.config_dict)  # the server's own reading of what we save
        self.targets = [(layer, mod) for layer in range(cfg.num_hidden_layers) for mod in LINEAR_MODULES
                        if parsed.targets(module_name(layer, mod))]
        if not self.targets:
            raise ValueError(f"--target-modules {target_modules!r} match no linear layer of this model")
        self.scale = parsed.scale_of("", r)
        self.use_dora = use_dora
        self.dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.A, self.B, self.m = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self.by_linear: dict[tuple[int, str], list[str]] = {}
        dev = model.device
        for layer, mod in self.targets:
            lin = model.linear(layer, mod)
            out_f = lin.slice_offsets[mod][1] - lin.slice_offsets[mod][0]
            a = torch.empty(r, lin.in_features)
            bound = 1 / math.sqrt(lin.in_features)  # kaiming_uniform(a=sqrt(5)), PEFT's default init of A
            a.uniform_(-bound, bound, generator=generator)
            key = f"{layer}_{mod}"
            self.A[key] = nn.Parameter(a.to(dev))
            self.B[key] = nn.Parameter(torch.zeros(out_f, r, device=dev))
            if use_dora:  # m starts at ||W|| per output row: a fresh DoRA equals the base model
                self.m[key] = nn.Parameter(model.linear_weight(layer, mod).float().norm(dim=1).to(dev))
            self.by_linear.setdefault((layer, lin.slice_names[0]), []).append(mod)

    def apply(self, layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mods = self.by_linear.get((layer.layer_idx, layer.slice_names[0]))
        if not mods:
            return y
        xd = self.dropout(x)
        parts = []
        for name in layer.slice_names:
            c0, c1 = layer.slice_offsets[name]
            ys = y[:, c0:c1]
            if name in mods:
                key = f"{layer.layer_idx}_{name}"
                A, B = self.A[key], self.B[key]
                delta = (xd.to(A.dtype) @ A.t()) @ B.t() * self.scale
                if self.use_dora:
                    ys = self._dora(layer, name, key, x, xd, ys, delta, c0, c1)
                else:
                    ys = ys + delta.to(ys.dtype)
            parts.append(ys)
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def _dora(self, layer, name, key, x, xd, ys, delta, c0, c1):
        """PEFT's DoRA forward: base + (g - 1) * W x + g * s B A x, g = m / ||W + s B A|| (norm detached)."""
        W = layer.slice_weight(name).float()
        A, B = self.A[key], self.B[key]
        norm = (W + self.scale * (B @ A)).norm(dim=1).detach()
        g = self.m[key] / norm
        if xd is x:  # no dropout: the base output without bias is already there
            base = ys if layer.bias is None else ys - layer.bias[c0:c1]
        else:
            base = F.linear(xd.float(), W)
        return ys + ((g - 1) * base + g * delta).to(ys.dtype)

    def peft_config(self) -> dict:
        return dict(self.config_dict)

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """The inverse of peft_tensors: start from a saved adapter of the same config."""
        with torch.no_grad():
            for name, t in self.peft_tensors().items():
                if name not in tensors or tensors[name].shape != t.shape:
                    raise ValueError(f"the saved adapter lacks {name} {tuple(t.shape)} or has another shape")
                layer, mod = _target_of(name)
                key = f"{layer}_{mod}"
                part = self.m if name.endswith("magnitude_vector") else self.A if ".lora_A." in name else self.B
                part[key].copy_(tensors[name])

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for layer, mod in self.targets:
            key, name = f"{layer}_{mod}", f"base_model.model.{module_name(layer, mod)}"
            out[f"{name}.lora_A.weight"] = self.A[key].detach().float().cpu().contiguous()
            out[f"{name}.lora_B.weight"] = self.B[key].detach().float().cpu().contiguous()
            if self.use_dora:
                out[f"{name}.lora_magnitude_vector"] = self.m[key].detach().float().cpu().contiguous()
        return out

    def attention(self, attn, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out  # acts in the linear seam only


class TrainablePrefix(nn.Module):
    """Learned per-layer keys/values ahead of every sequence (positions of real tokens start at nvt).

    Stored like PEFT: one tensor [nvt, layers * 2 * kv_dim] (L0.key, L0.value, L1.key, ...), each part
    [kv_heads, nvt, head_dim] once viewed. With `projection`, it is MLP(embedding) (the inference form
    is what gets saved)."""

    kind = "prefix"

    def __init__(self, model, *, num_virtual_tokens: int, projection: bool, encoder_hidden_size: int,
                 base_name: str, generator: torch.Generator):
        super().__init__()
        cfg = model.config
        self.nvt, self.layers = num_virtual_tokens, cfg.num_hidden_layers
        self.kv_heads, self.head_dim = cfg.num_key_value_heads, cfg.head_dim
        token_dim = self.kv_heads * self.head_dim
        out = self.layers * 2 * token_dim
        dev = model.device
        self.projection = projection
        self.config_dict = dict(
            peft_type="PREFIX_TUNING", task_type="CAUSAL_LM", base_model_name_or_path=base_name,
            num_virtual_tokens=num_virtual_tokens, token_dim=token_dim, num_transformer_submodules=1,
            num_attention_heads=self.kv_heads, num_layers=self.layers, encoder_hidden_size=encoder_hidden_size,
            prefix_projection=projection, inference_mode=True)
        if projection:
            self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, token_dim, generator=generator).to(dev))
            self.mlp = nn.Sequential(nn.Linear(token_dim, encoder_hidden_size), nn.Tanh(),
                                     nn.Linear(encoder_hidden_size, out)).to(dev)
        else:
            self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, out, generator=generator).to(dev))

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.projection:
            raise ValueError("a saved prefix holds only the MLP's output: load it without --prefix-projection")
        with torch.no_grad():
            self.embedding.copy_(tensors["prompt_embeddings"])

    def table(self) -> torch.Tensor:
        """[nvt, layers * 2 * kv_dim], the stored (inference) form."""
        return self.mlp(self.embedding) if self.projection else self.embedding

    def kv(self) -> torch.Tensor:
        """[2 * layers, kv_heads, nvt, head_dim]: row 2i = layer i's keys, 2i + 1 its values."""
        return self.table().view(self.nvt, 2 * self.layers, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)

    def peft_config(self) -> dict:
        return dict(self.config_dict)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.table().detach().float().cpu().contiguous()}


class TrainablePrompt(nn.Module):
    """Learned input embeddings prepended to every sequence (prompt tuning); positions 0 .. nvt + L - 1."""

    kind = "prompt"

    def __init__(self, model, tokenizer, *, num_virtual_tokens: int, init: str, init_text: str | None,
                 base_name: str, generator: torch.Generator):
        super().__init__()
        cfg = model.config
        emb = model.embed_tokens.weight.detach().float()
        if init == "text":
            if not init_text:
                raise ValueError("--prompt-tuning-init text needs --prompt-tuning-init-text")
            ids = tokenizer(init_text, add_special_tokens=False).input_ids
            ids = (ids * math.ceil(num_virtual_tokens / len(ids)))[:num_virtual_tokens]  # PEFT repeats the text
            start = emb[torch.tensor(ids, device=emb.device)].clone()
        else:  # random, at the scale of the real embeddings
            start = torch.randn(num_virtual_tokens, cfg.hidden_size, generator=generator).to(emb.device) * emb.std()
        self.nvt = num_virtual_tokens
        self.embedding = nn.Parameter(start)
        self.config_dict = dict(
            peft_type="PROMPT_TUNING", task_type="CAUSAL_LM", base_model_name_or_path=base_name,
            num_virtual_tokens=num_virtual_tokens, token_dim=cfg.hidden_size, num_transformer_submodules=1,
            num_attention_heads=cfg.num_attention_heads, num_layers=cfg.num_hidden_layers,
            prompt_tuning_init="TEXT" if init == "text" else "RANDOM",
            prompt_tuning_init_text=init_text if init == "text" else None,
            tokenizer_name_or_path=base_name if init == "text" else None, inference_mode=True)

    def peft_config(self) -> dict:
        return dict(self.config_dict)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.embedding.detach().float().cpu().contiguous()}

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.embedding.copy_(tensors["prompt_embeddings"])
