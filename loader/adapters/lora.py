"""Read a PEFT LoRA / DoRA / AdaLoRA adapter from disk into its serving form, validated against the base.

Serving form, per adapted (layer, module): A [r, in], Bt [r, out] and a scale, with
    delta(x) = scale * (x @ A.T) @ Bt
AdaLoRA folds E into A (A*E); DoRA folds g = m / ||W + s B A|| (per output row, from the served base
weights) into Bt and keeps g for the base part: y = b + g * (W x) + g * s * B A x.
Only safetensors are read; .bin/.pt files are refused, never unpickled.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from loader.adapters.adapter_config import LINEAR_MODULES, UNSERVED_TYPES, ConfigProblems, LoraAdapterConfig
from server.errors import AdapterLoadError
from loader.config import ModelConfig

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
_KEY = re.compile(r"^base_model\.model\.(model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+))\."
                  r"(lora_A|lora_B|lora_E|lora_magnitude_vector)(?:\.weight)?$")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@dataclass
class LoraModule:
    A: torch.Tensor  # [r, in]
    Bt: torch.Tensor  # [r, out]
    scale: float
    dora_g: torch.Tensor | None = None  # [out]: DoRA's m / ||W + s B A||

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass
class LoraAdapter:
    adapter_id: str
    path: Path
    config: LoraAdapterConfig
    modules: dict[tuple[int, str], LoraModule] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "adalora" if self.config.peft_type == "ADALORA" else ("dora" if self.config.use_dora else "lora")

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.modules.values()
                   for t in (m.A, m.Bt, m.dora_g) if t is not None)


def module_dims(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """module -> (in_features, out_features)."""
    h, q, kv, i = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, \
        cfg.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def random_lora(cfg: ModelConfig, rank: int, modules, generator: torch.Generator, a_std: float | None,
                b_std: float) -> dict[str, torch.Tensor]:
    """Random LoRA weights under PEFT's saved names, every layer x `modules` in that order (A then B):
    warm-up, benchmarks and tests. a_std None: 1/sqrt(in_features)."""
    dims, tensors = module_dims(cfg), {}
    for layer in range(cfg.num_hidden_layers):
        for mod in modules:
            fan_in, fan_out = dims[mod]
            key = f"base_model.model.model.layers.{layer}.{_PARENT[mod]}.{mod}"
            a = torch.randn(rank, fan_in, generator=generator)
            tensors[f"{key}.lora_A.weight"] = a / fan_in ** 0.5 if a_std is None else a * a_std
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * b_std
    return tensors


def save_adapter(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write a PEFT adapter directory: adapter_config.json + adapter_model.safetensors."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(config))
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    return path


def read_adapter_config(path: Path) -> dict:
    if not path.is_dir():
        raise AdapterLoadError("not_found", f"{path}: no such adapter directory")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise AdapterLoadError("not_found", f"{path}: {CONFIG_FILE} is missing")
    try:
        d = json.loads(cfg_file.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad UTF-8 or JSON
        raise AdapterLoadError("invalid", f"{cfg_file}: not valid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise AdapterLoadError("invalid", f"{cfg_file}: expected a JSON object, got {type(d).__name__}")
    if not isinstance(d.get("peft_type", ""), str):
        raise AdapterLoadError("invalid", f"{cfg_file}: peft_type: must be a string, got {d['peft_type']!r}")
    ptype = d.get("peft_type", "").upper()
    if not ptype and ("config" in d or (path / "pytorch_adapter.bin").exists()):
        kind = d.get("config", {}).get("architecture") if isinstance(d.get("config"), dict) else None
        raise AdapterLoadError("unsupported", f"{path.name}: an adapter-transformers (AdapterHub) adapter"
                               f"{f' ({kind})' if kind else ''} is not served (only Hugging Face PEFT adapters)")
    if ptype in UNSERVED_TYPES:
        raise AdapterLoadError("unsupported", f"{path.name}: {ptype} adapters are not served (supported: LoRA, "
                               "DoRA, AdaLoRA, IA3, prefix, prompt and p-tuning, adaption prompt)")
    return d


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of the adapter's safetensors file; refuses pickles; clear errors for broken files."""
    file = path / WEIGHTS_FILE
    if not file.is_file():
        pickles = [p for p in PICKLE_FILES if (path / p).exists()]
        if pickles:
            raise AdapterLoadError("invalid", f"{path.name}: only {WEIGHTS_FILE} is loaded; {pickles[0]} is a pickle "
                                   "file and is never unpickled (re-save the adapter with safe_serialization=True)")
        raise AdapterLoadError("not_found", f"{path}: {WEIGHTS_FILE} is missing")
    try:
        with safe_open(str(file), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for bad headers/truncation
        raise AdapterLoadError("invalid", f"{file}: not a valid safetensors file ({exc})") from None
    # every adapter kind served holds floating-point weights only
    bad = [f"{k} ({str(t.dtype).removeprefix('torch.')})" for k, t in tensors.items() if not t.is_floating_point()]
    if bad:
        raise AdapterLoadError("invalid", f"{file}: tensors must be floating-point: {', '.join(bad[:5])}"
                               + (" ..." if len(bad) > 5 else ""))
    return tensors


def load_lora_adapter(adapter_id: str, path: Path, model: ModelConfig, max_rank: int,
                      base_weight: Callable[[int, str], torch.Tensor], dtype: torch.dtype | None,
                      check_finite: bool = True) -> LoraAdapter:
    """base_weight(layer, module) -> the served [out, in] weight (dequantized) for DoRA's norms.

    dtype None keeps each tensor in the file's dtype (no copy: A and Bt are views of what was read; the
    server's packer converts while it copies into the host buffer, once). check_finite False: the caller
    checks (layout.pack checks its whole buffer in one pass)."""
    cfg = LoraAdapterConfig.from_dict(read_adapter_config(path), f"{path.name}/{CONFIG_FILE}")
    tensors = read_safetensors(path)
    dims = module_dims(model)
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    problems = ConfigProblems(path.name)  # the reason is set by what each problem is, not read from its text
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            problems.unserved(f"unsupported tensor {key} (only LoRA on the linear layers of the decoder is served)")
            continue
        layer, parent, module, part = int(m.group(2)), m.group(3), m.group(4), m.group(5)
        if module not in _PARENT or _PARENT[module] != parent:
            problems.bad(key, f"unknown module {parent}.{module}")
            continue
        if layer >= model.num_hidden_layers:
            raise AdapterLoadError("incompatible", f"{path.name}: tensor {key} is for layer {layer} but the base "
                                   f"model has {model.num_hidden_layers} layers (made for another base model?)")
        parts.setdefault((layer, module), {})[part] = t
    problems.raise_any(limit=5)
    expected = {(layer, mod) for layer in range(model.num_hidden_layers) for mod in LINEAR_MODULES
                if cfg.targets(f"model.layers.{layer}.{_PARENT[mod]}.{mod}")}
    if not expected:
        raise AdapterLoadError("invalid", f"{path.name}: target_modules match no linear layer of this model")
    missing, extra = sorted(expected - parts.keys()), sorted(parts.keys() - expected)
    if missing or extra:
        what = (f"missing tensors for {missing[:3]}" if missing else "") + \
               (f" tensors for modules the config does not target: {extra[:3]}" if extra else "")
        raise AdapterLoadError("invalid", f"{path.name}: adapter_config.json and {WEIGHTS_FILE} disagree: {what}")

    adapter = LoraAdapter(adapter_id, path, cfg)
    need = ("lora_A", "lora_B") + (("lora_E",) if cfg.peft_type == "ADALORA" else ()) + \
        (("lora_magnitude_vector",) if cfg.use_dora else ())
    for (layer, mod), p in sorted(parts.items()):
        name = f"model.layers.{layer}.{_PARENT[mod]}.{mod}"
        absent = [n for n in need if n not in p]
        if absent or set(p) - set(need):
            raise AdapterLoadError("invalid", f"{path.name}: {name} has tensors {sorted(p)}, expected {list(need)}")
        A, B = p["lora_A"], p["lora_B"]  # as the file holds them: a plain LoRA is converted once, by its packer
        fan_in, fan_out = dims[mod]
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise AdapterLoadError("invalid", f"{path.name}: {name} lora_A {tuple(A.shape)} / lora_B "
                                   f"{tuple(B.shape)} are not an (r, in) / (out, r) pair")
        r = A.shape[0]
        if A.shape[1] != fan_in or B.shape[0] != fan_out:
            raise AdapterLoadError("incompatible", f"{path.name}: {name} lora_A {tuple(A.shape)} / lora_B "
                                   f"{tuple(B.shape)} do not fit this base model (expected ({r}, {fan_in}) / "
                                   f"({fan_out}, {r})): made for another base model?")
        if cfg.peft_type == "LORA" and r != cfg.rank_of(name):
            raise AdapterLoadError("invalid", f"{path.name}: {name} has rank {r} but the config says "
                                   f"{cfg.rank_of(name)}")
        if r > max_rank:
            raise AdapterLoadError("too_large", f"{path.name}: rank {r} at {name} is over the server's "
                                   f"--max-lora-rank {max_rank}")
        if check_finite and not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise AdapterLoadError("invalid", f"{path.name}: {name} has NaN or infinite weights")
        scale = cfg.scale_of(name, r)
        if cfg.peft_type == "ADALORA":
            E = p["lora_E"].float()
            if E.shape != (r, 1):
                raise AdapterLoadError("invalid", f"{path.name}: {name} lora_E {tuple(E.shape)}, expected ({r}, 1)")
            A = A.float() * E
        g = None
        if cfg.use_dora:
            A, B = A.float(), B.float()
            mag = p["lora_magnitude_vector"].float().reshape(-1)
            if mag.numel() != fan_out:
                raise AdapterLoadError("incompatible", f"{path.name}: {name} magnitude has {mag.numel()} entries, "
                                       f"expected {fan_out}")
            W = base_weight(layer, mod).float()
            norm = (W + scale * (B @ A)).norm(p=2, dim=1)  # [out], PEFT's weight_norm
            g = mag / norm
            B = B * g[:, None]
        if dtype is not None:
            A, B = A.to(dtype), B.to(dtype)
        adapter.modules[(layer, mod)] = LoraModule(A, B.t(), scale, None if g is None else g.to(dtype or torch.float32))
    return adapter
