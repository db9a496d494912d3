"""ModelConfig: the architecture of a Llama-family base model, parsed once from any source."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
DTYPES = ("float32", "bfloat16", "float16")

# transformers' defaults for keys a config.json may leave out (LlamaConfig, MistralConfig, Qwen2Config).
# num_key_value_heads None = num_attention_heads.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(max_position_embeddings=2048, num_key_value_heads=None, attention_bias=False, bos_token_id=1,
                  eos_token_id=2),
    "mistral": dict(max_position_embeddings=4096 * 32, num_key_value_heads=8, attention_bias=False, bos_token_id=1,
                    eos_token_id=2),
    "qwen2": dict(max_position_embeddings=32768, num_key_value_heads=32, attention_bias=True, bos_token_id=None,
                  eos_token_id=None),
}
_HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Rope types that scale against the pretraining length; transformers fills it from max_position_embeddings.
_NEEDS_ORIGINAL_LEN = ("llama3", "yarn", "longrope")


@dataclass
class ModelConfig:
    architecture: str  # "llama" | "mistral" | "qwen2" (the HF model_type)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # HF rope parameters without rope_theta, with "rope_type"; None = default rope
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v biases (o_proj too for llama)
    mlp_bias: bool
    bos_token_id: int | None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    dtype: str = "float32"  # dtype of the checkpoint's weights
    name: str = ""

    def __post_init__(self) -> None:
        problems = []
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            problems.append(f"architecture {self.architecture!r} is not supported; supported: "
                            f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems:
            if self.hidden_size % self.num_attention_heads:
                problems.append(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                                f"{self.num_attention_heads}")
            if self.num_attention_heads % self.num_key_value_heads:
                problems.append(f"num_attention_heads {self.num_attention_heads} is not divisible by "
                                f"num_key_value_heads {self.num_key_value_heads}")
            if self.head_dim % 2:
                problems.append(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            problems.append(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            problems.append(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling.get("rope_type"), str):
            problems.append(f"rope_scaling needs a 'rope_type', got {self.rope_scaling}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if isinstance(self.vocab_size, int):
            ids = [("bos_token_id", self.bos_token_id), ("pad_token_id", self.pad_token_id)]
            ids += [("eos_token_ids", t) for t in self.eos_token_ids]
            for what, tok in ids:
                if tok is not None and not 0 <= tok < self.vocab_size:
                    problems.append(f"{what} {tok} is outside the vocabulary [0, {self.vocab_size})")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_hf_dict(cls, d: dict, name: str) -> "ModelConfig":
        """Parse a transformers config.json dict (4.x `rope_scaling` + `rope_theta` or 5.x `rope_parameters`)."""
        arch = d.get("model_type")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"model_type {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        defaults = _DEFAULTS[arch]
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if d.get(k) is None]
        if missing:
            raise ValueError(f"config lacks {', '.join(missing)}")
        heads = d["num_attention_heads"]
        max_pos = d.get("max_position_embeddings") or defaults["max_position_embeddings"]
        theta, rope_scaling = _parse_rope(d, max_pos)
        eos = d.get("eos_token_id", defaults["eos_token_id"])
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads", defaults["num_key_value_heads"]) or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", defaults["attention_bias"])),
            mlp_bias=bool(d.get("mlp_bias", False)),
            bos_token_id=_token_id(d.get("bos_token_id", defaults["bos_token_id"])),
            eos_token_ids=eos_list(eos),
            pad_token_id=_token_id(d.get("pad_token_id")),
            dtype=_dtype_name(d.get("dtype") or d.get("torch_dtype") or "float32"),
            name=name,
        )

    def to_hf_dict(self) -> dict:
        """A config.json dict that transformers' Llama/Mistral/Qwen2 config classes accept."""
        rope = {**(self.rope_scaling or {"rope_type": "default"}), "rope_theta": self.rope_theta}
        d = dict(
            model_type=self.architecture, architectures=[_HF_CLASSES[self.architecture]],
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
            rope_parameters=rope, max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, hidden_act="silu", bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids) or None,
            pad_token_id=self.pad_token_id, dtype=self.dtype,
        )
        if self.architecture == "llama":
            d.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        return d


def eos_list(eos: int | list[int] | None) -> list[int]:
    """config/generation_config `eos_token_id` (int, list or None) -> list of ids."""
    if eos is None:
        return []
    ids = [int(t) for t in eos] if isinstance(eos, (list, tuple)) else [int(eos)]
    return [t for t in dict.fromkeys(ids) if t >= 0]


def _parse_rope(d: dict, max_pos: int) -> tuple[float, dict | None]:
    """-> (rope_theta, rope_scaling or None), with transformers' precedence: rope_scaling over rope_parameters."""
    params = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", None) or d.get("rope_theta") or 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    params["rope_type"] = rope_type
    if rope_type in _NEEDS_ORIGINAL_LEN:
        params.setdefault("original_max_position_embeddings", d.get("original_max_position_embeddings", max_pos))
    return theta, params


def _token_id(tok: int | None) -> int | None:
    """Old configs write -1 for "no such token"."""
    return None if tok is None or tok < 0 else int(tok)


def _dtype_name(dtype: Any) -> str:
    """'bfloat16', 'torch.bfloat16' or torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).removeprefix("torch.")
