"""IA3 adapters (PEFT): learned per-channel scaling vectors (../shared/PEFT_FORMAT.md).

`...{module}.ia3_l` of shape (out, 1) multiplies a module's output (bias included: PEFT scales the
base layer's result); for `feedforward_modules`, shape (1, in) multiplies the module's input.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loader.adapters.adapter_config import LINEAR_MODULES, ConfigProblems
from server.errors import AdapterLoadError
from loader.config import ModelConfig
from loader.adapters.lora import _PARENT, module_dims, read_adapter_config, read_safetensors

_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.ia3_l$")
_KNOWN = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "target_modules",
          "feedforward_modules", "fan_in_fan_out", "init_ia3_weights", "modules_to_save", "exclude_modules",
          "auto_mapping", "peft_version", "layers_to_transform", "layers_pattern"}


@dataclass
class Ia3Adapter:
    adapter_id: str
    path: Path
    kind: str = "ia3"
    # (layer, module) -> (vector [out] or [in], scales the input?)
    vectors: dict[tuple[int, str], tuple[torch.Tensor, bool]] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return 0

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v, _ in self.vectors.values())

    def to(self, device: torch.device, dtype: torch.dtype) -> "Ia3Adapter":
        return Ia3Adapter(self.adapter_id, self.path, self.kind,
                          {k: (v.to(device, dtype), inp) for k, (v, inp) in self.vectors.items()})


def load_ia3_adapter(adapter_id: str, path: Path, model: ModelConfig) -> Ia3Adapter:
    d = read_adapter_config(path)
    name = path.name
    p = ConfigProblems(f"{name}/adapter_config.json")
    p.unknown_fields(d, _KNOWN)
    if d.get("fan_in_fan_out"):
        p.unserved("fan_in_fan_out is not supported")
    if d.get("modules_to_save"):
        p.unserved("modules_to_save is not supported")
    if d.get("task_type") not in (None, "CAUSAL_LM"):
        p.unserved(f"task_type {d['task_type']!r} (only CAUSAL_LM is served)")
    # which modules are adapted is read from the tensors; the selectors are only checked for shape
    for field in ("target_modules", "exclude_modules"):
        p.modules(d, field)
    p.layer_indices(d, "layers_to_transform")
    p.strings(d, "layers_pattern")
    p.flag(d, "init_ia3_weights")
    ff = p.modules(d, "feedforward_modules") or frozenset()
    p.raise_any()
    ff = set(ff) if isinstance(ff, frozenset) else {m for m in LINEAR_MODULES if re.fullmatch(ff, m)}
    dims = module_dims(model)
    out = Ia3Adapter(adapter_id, path)
    for key, t in read_safetensors(path).items():
        m = _KEY.match(key)
        if m is None or m.group(3) not in _PARENT or _PARENT[m.group(3)] != m.group(2):
            raise AdapterLoadError("unsupported", f"{name}: unsupported tensor {key} (IA3 on the decoder's linear "
                                   "layers is served)")
        layer, mod = int(m.group(1)), m.group(3)
        if layer >= model.num_hidden_layers:
            raise AdapterLoadError("incompatible", f"{name}: {key} is for layer {layer}, the base model has "
                                   f"{model.num_hidden_layers}")
        fan_in, fan_out = dims[mod]
        is_input = mod in ff
        want = (1, fan_in) if is_input else (fan_out, 1)
        if t.dim() != 2 or (t.shape[0] if is_input else t.shape[1]) != 1:
            raise AdapterLoadError("invalid", f"{name}: {key} has shape {tuple(t.shape)}, expected {want} "
                                   f"({'input' if is_input else 'output'} scaling: feedforward_modules decides)")
        if tuple(t.shape) != want:
            raise AdapterLoadError("incompatible", f"{name}: {key} has shape {tuple(t.shape)}, expected {want}")
        v = t.float().flatten()
        if not torch.isfinite(v).all():
            raise AdapterLoadError("invalid", f"{name}: {key} has NaN or infinite values")
        out.vectors[(layer, mod)] = (v, is_input)
    if not out.vectors:
        raise AdapterLoadError("invalid", f"{name}: no ia3_l tensors")
    return out
