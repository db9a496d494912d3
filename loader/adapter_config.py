"""`adapter_config.json` of a PEFT LoRA-family adapter, parsed into a dataclass.

Scaling is computed once per module (rank_pattern / alpha_pattern / rsLoRA, PEFT's rules), target
matching mirrors PEFT's `check_target_module_exists`, and every field we cannot serve faithfully is
reported together in one error instead of being loaded wrong.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from loader.adapter_errors import AdapterLoadError

LORA_TYPES = ("LORA", "ADALORA")
# Kinds PEFT can save that this server does not serve (yet): refused by name.
UNSERVED_TYPES = ("LOHA", "LOKR", "OFT", "BOFT", "VERA", "FOURIERFT", "HRA", "VBLORA", "LN_TUNING", "POLY",
                  "XLORA", "BONE", "MISS", "CPT", "RANDLORA", "SHIRA", "C3A", "ROAD", "WAVEFT", "DELORA", "OSF")
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Keys that do not change inference math (training-only or bookkeeping).
_IGNORED = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "lora_dropout",
            "init_lora_weights", "auto_mapping", "peft_version", "layers_pattern", "lora_alpha", "r",
            "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "layers_to_transform", "bias",
            "use_dora", "exclude_modules", "loftq_config", "eva_config", "corda_config", "megatron_config",
            "megatron_core", "layer_replication", "runtime_config", "fan_in_fan_out", "modules_to_save",
            "lora_bias", "target_parameters", "trainable_token_indices", "use_qalora", "qalora_group_size",
            "alora_invocation_tokens", "arrow_config", "ensure_weight_tying", "use_bdlora", "bdlora_config",
            # AdaLoRA schedule (training only)
            "target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step"}
# Keys whose non-default value would change the math: value -> allowed.
_MUST_BE_DEFAULT = {
    "bias": lambda v: v in (None, "none"),
    "fan_in_fan_out": lambda v: not v,
    "modules_to_save": lambda v: not v,
    "lora_bias": lambda v: not v,
    "target_parameters": lambda v: not v,
    "trainable_token_indices": lambda v: not v,
    "use_qalora": lambda v: not v,
    "layer_replication": lambda v: not v,
    "alora_invocation_tokens": lambda v: not v,
    "megatron_config": lambda v: not v,
    "use_bdlora": lambda v: not v,
}


@dataclass
class LoraAdapterConfig:
    peft_type: str  # "LORA" | "ADALORA"
    r: int
    lora_alpha: float
    target_modules: str | frozenset[str]  # a regex (fullmatch) or a set of names / name suffixes
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, Any] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] = ()
    exclude_modules: str | frozenset[str] | None = None
    base_model_name_or_path: str | None = None
    init_r: int | None = None  # AdaLoRA: the rank PEFT divides by

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "adapter_config.json") -> "LoraAdapterConfig":
        problems = []
        ptype = str(d.get("peft_type", "")).upper()
        if ptype not in LORA_TYPES:
            raise AdapterLoadError("unsupported", f"{source}: peft_type {ptype or None!r} is not a LoRA adapter")
        if d.get("task_type") not in (None, "CAUSAL_LM"):
            problems.append(f"task_type {d['task_type']!r} (only CAUSAL_LM is served)")
        for key, ok in _MUST_BE_DEFAULT.items():
            if key in d and not ok(d[key]):
                problems.append(f"{key}={d[key]!r} is not supported")
        for key, value in d.items():
            if key not in _IGNORED and value not in (None, False, [], {}, ""):
                problems.append(f"unknown field {key}={value!r}")
        tm = d.get("target_modules")
        if tm == "all-linear":
            tm = frozenset(LINEAR_MODULES)
        elif isinstance(tm, list):
            tm = frozenset(tm)
        elif not isinstance(tm, str):
            problems.append(f"target_modules must be a list or a regex string, got {tm!r}")
            tm = frozenset()
        r = d.get("init_r") if ptype == "ADALORA" and d.get("init_r") else d.get("r", 8)
        if not isinstance(r, int) or r < 1:
            problems.append(f"r must be a positive integer, got {r!r}")
        if not isinstance(d.get("lora_alpha", 8), (int, float)):
            problems.append(f"lora_alpha must be a number, got {d.get('lora_alpha')!r}")
        ltt = d.get("layers_to_transform")
        if isinstance(ltt, int):
            ltt = (ltt,)
        elif ltt is not None:
            ltt = tuple(ltt)
        lp = d.get("layers_pattern") or ()
        lp = (lp,) if isinstance(lp, str) else tuple(lp)
        em = d.get("exclude_modules")
        if isinstance(em, list):
            em = frozenset(em)
        rank_pattern = d.get("rank_pattern") or {}
        if ptype == "LORA" and any(not isinstance(v, int) or v < 1 for v in rank_pattern.values()):
            problems.append("rank_pattern values must be positive integers")
        if problems:
            raise AdapterLoadError("unsupported" if any("not supported" in p or "unknown" in p for p in problems)
                                   else "invalid", f"{source}: " + "; ".join(problems))
        return cls(peft_type=ptype, r=int(r), lora_alpha=float(d.get("lora_alpha", 8)), target_modules=tm,
                   use_rslora=bool(d.get("use_rslora")), use_dora=bool(d.get("use_dora")),
                   rank_pattern=rank_pattern if ptype == "LORA" else {},
                   alpha_pattern=d.get("alpha_pattern") or {}, layers_to_transform=ltt, layers_pattern=lp,
                   exclude_modules=em, base_model_name_or_path=d.get("base_model_name_or_path"),
                   init_r=int(d["init_r"]) if ptype == "ADALORA" and d.get("init_r") else None)

    # -- PEFT's module matching ------------------------------------------------------------------
    def targets(self, name: str) -> bool:
        """Does PEFT put this adapter on module `name` (e.g. 'model.layers.3.self_attn.q_proj')?"""
        em = self.exclude_modules
        if em:
            if isinstance(em, str) and re.fullmatch(em, name):
                return False
            if not isinstance(em, str) and (name in em or any(name.endswith(f".{k}") for k in em)):
                return False
        tm = self.target_modules
        if isinstance(tm, str):
            return re.fullmatch(tm, name) is not None
        if name in tm:
            return True
        if not any(name.endswith(f".{k}") for k in tm):
            return False
        if not self.layers_to_transform:
            return True
        if self.layers_pattern:
            m = None
            for pattern in self.layers_pattern:
                m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
                if m:
                    break
        else:
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        return m is not None and int(m.group("idx")) in self.layers_to_transform

    @staticmethod
    def _pattern(patterns: dict[str, Any], name: str):
        for key, value in patterns.items():
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        return None

    def rank_of(self, name: str) -> int:
        r = self._pattern(self.rank_pattern, name)
        return int(r) if r is not None else self.r

    def scale_of(self, name: str, rank: int) -> float:
        """LoRA: alpha / r (alpha / sqrt(r) with rsLoRA). AdaLoRA: alpha / (rank PEFT divides by + 1e-5)."""
        alpha = self._pattern(self.alpha_pattern, name)
        alpha = float(alpha) if alpha is not None else self.lora_alpha
        if self.peft_type == "ADALORA":
            return alpha / (rank + 1e-5)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank
