"""`adapter_config.json` of a PEFT LoRA-family adapter, parsed into a dataclass.

Scaling is computed once per module (rank_pattern / alpha_pattern / rsLoRA, PEFT's rules), target
matching mirrors PEFT's `check_target_module_exists`, and every field we cannot serve faithfully is
reported together in one error instead of being loaded wrong. Every field the server reads is
checked for its type and shape here (regexes compiled as PEFT builds them), so that a malformed
config is one "invalid" error naming the field, never an exception from matching or scaling later;
`ConfigProblems` does the same for the other kinds' configs.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from server.errors import AdapterLoadError

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


class ConfigProblems:
    """What is wrong with one adapter_config.json, raised together as one AdapterLoadError: a malformed
    value ("<field>: <what is wrong>") makes it "invalid"; otherwise an option this server does not serve
    makes it "unsupported". The readers return the value in its served form, or None after noting why."""

    def __init__(self, source: str):
        self.source = source
        self.invalid: list[str] = []
        self.unsupported: list[str] = []

    def bad(self, name: str, what: str) -> None:
        self.invalid.append(f"{name}: {what}")

    def unserved(self, what: str) -> None:
        self.unsupported.append(what)

    def raise_any(self, limit: int | None = None) -> None:
        problems = self.invalid + self.unsupported
        if problems:
            shown = problems[:limit] if limit else problems
            raise AdapterLoadError("invalid" if self.invalid else "unsupported", f"{self.source}: " + "; ".join(shown)
                                   + (" ..." if len(shown) < len(problems) else ""))

    def unknown_fields(self, d: dict[str, Any], known: set[str]) -> None:
        """Fields we do not know are refused unless they hold an empty / default value."""
        for key, value in d.items():
            if key not in known and value not in (None, False, [], {}, ""):
                self.unserved(f"unknown field {key}={value!r}")

    def integer(self, d: dict[str, Any], name: str, default: int | None = None, minimum: int = 1) -> int | None:
        """An integer >= minimum (JSON true/false and 8.0 are not integers); absent or null -> default."""
        v = d.get(name)
        if v is None:
            return default
        if not _is_int(v) or v < minimum:
            self.bad(name, f"must be an integer >= {minimum}, got {v!r}")
            return None
        return v

    def number(self, d: dict[str, Any], name: str, default: float) -> float | None:
        v = d.get(name)
        if v is None:
            return default
        if not _is_number(v):
            self.bad(name, f"must be a finite number, got {v!r}")
            return None
        return float(v)

    def flag(self, d: dict[str, Any], name: str) -> bool:
        v = d.get(name)
        if v is not None and not isinstance(v, bool):
            self.bad(name, f"must be true or false, got {v!r}")
        return v is True

    def string(self, d: dict[str, Any], name: str) -> str | None:
        v = d.get(name)
        if v is not None and not isinstance(v, str):
            self.bad(name, f"must be a string, got {v!r}")
            return None
        return v

    def modules(self, d: dict[str, Any], name: str) -> str | frozenset[str] | None:
        """PEFT's module selector: a list of names / name suffixes, or one regex (fullmatch); null -> None."""
        v = d.get(name)
        if v is None:
            return None
        if isinstance(v, str):
            return v if self.regex(name, v, v) else None
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            return frozenset(v)
        self.bad(name, f"must be a list of module names or a regex string, got {v!r}")
        return None

    def strings(self, d: dict[str, Any], name: str) -> tuple[str, ...]:
        """A string or a list of strings; null -> ()."""
        v = d.get(name)
        if v is None:
            return ()
        if isinstance(v, str):
            return (v,)
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            return tuple(v)
        self.bad(name, f"must be a string or a list of strings, got {v!r}")
        return ()

    def layer_indices(self, d: dict[str, Any], name: str) -> tuple[int, ...] | None:
        """An index or a list of indices (>= 0); null -> None."""
        v = d.get(name)
        if v is None:
            return None
        if _is_int(v) and v >= 0:
            return (v,)
        if isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v):
            return tuple(v)
        self.bad(name, f"must be a layer index or a list of layer indices (integers >= 0), got {v!r}")
        return None

    def regex(self, name: str, shown: str, pattern: str) -> bool:
        """Does `pattern` (built from the config's `shown` text) compile? Notes why not."""
        try:
            re.compile(pattern)
            return True
        except (re.error, RecursionError, OverflowError) as exc:
            self.bad(name, f"{shown!r} is not a valid regular expression ({exc})")
            return False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# The regexes PEFT builds from rank_pattern / alpha_pattern keys and from layers_pattern entries.
def _pattern_regex(key: str) -> str:
    return rf"(.*\.)?({key})$"


def _layers_regex(pattern: str) -> str:
    return rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."


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
        """Every field's type and value is checked here, so that matching and scaling cannot fail later."""
        ptype = str(d.get("peft_type", "")).upper()
        if ptype not in LORA_TYPES:
            raise AdapterLoadError("unsupported", f"{source}: peft_type {ptype or None!r} is not a LoRA adapter")
        p = ConfigProblems(source)
        if d.get("task_type") not in (None, "CAUSAL_LM"):
            p.unserved(f"task_type {d['task_type']!r} (only CAUSAL_LM is served)")
        for key, ok in _MUST_BE_DEFAULT.items():
            if key in d and not ok(d[key]):
                p.unserved(f"{key}={d[key]!r} is not supported")
        p.unknown_fields(d, _IGNORED)
        if d.get("target_modules") == "all-linear":
            tm = frozenset(LINEAR_MODULES)
        elif d.get("target_modules") is None:
            p.bad("target_modules", "missing (a list of module names or a regex string)")
            tm = None
        else:
            tm = p.modules(d, "target_modules")
        adalora_r = ptype == "ADALORA" and d.get("init_r") is not None
        r = p.integer(d, "r", default=8)
        if adalora_r:
            r = p.integer(d, "init_r")
        alpha = p.number(d, "lora_alpha", default=8.0)
        use_rslora, use_dora = p.flag(d, "use_rslora"), p.flag(d, "use_dora")
        ltt = p.layer_indices(d, "layers_to_transform")
        lp = tuple(x for x in p.strings(d, "layers_pattern") if p.regex("layers_pattern", x, _layers_regex(x)))
        em = p.modules(d, "exclude_modules")
        # LoRA: module pattern -> rank; AdaLoRA saves its pruning masks there (unused: ranks come from the tensors)
        rank_pattern: dict[str, Any] = {}
        if ptype == "LORA":
            rank_pattern = cls._patterns(p, d, "rank_pattern", lambda v: _is_int(v) and v >= 1, "a positive integer")
        elif not isinstance(d.get("rank_pattern") or {}, dict):
            p.bad("rank_pattern", f"must be an object, got {d['rank_pattern']!r}")
        alpha_pattern = cls._patterns(p, d, "alpha_pattern", _is_number, "a finite number")
        base = p.string(d, "base_model_name_or_path")
        p.raise_any()
        return cls(peft_type=ptype, r=r, lora_alpha=alpha, target_modules=tm, use_rslora=use_rslora,
                   use_dora=use_dora, rank_pattern=rank_pattern,
                   alpha_pattern=alpha_pattern, layers_to_transform=ltt, layers_pattern=lp, exclude_modules=em,
                   base_model_name_or_path=base, init_r=r if adalora_r else None)

    @staticmethod
    def _patterns(p: ConfigProblems, d: dict[str, Any], name: str, ok, what: str) -> dict[str, Any]:
        """rank_pattern / alpha_pattern: {regex key: value}; keys must compile as PEFT embeds them."""
        v = d.get(name) or {}
        if not isinstance(v, dict):
            p.bad(name, f"must be an object mapping module patterns to values, got {v!r}")
            return {}
        for key, value in v.items():
            p.regex(name, key, _pattern_regex(key))
            if not ok(value):
                p.bad(name, f"the value for {key!r} must be {what}, got {value!r}")
        return v

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
                m = re.match(_layers_regex(pattern), name)
                if m:
                    break
        else:
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        return m is not None and int(m.group("idx")) in self.layers_to_transform

    @staticmethod
    def _pattern(patterns: dict[str, Any], name: str):
        for key, value in patterns.items():
            if re.match(_pattern_regex(key), name):
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
