"""The Hugging Face tensor names and shapes a ModelConfig implies, and name normalization."""
from __future__ import annotations

from loader.config import ModelConfig
from server.errors import ModelLoadError


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `cfg` must hold -> its shape; Linear weights are (out, in)."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}"
        shapes.update({
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (q, h),
            f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h),
            f"{p}.self_attn.o_proj.weight": (h, q),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.mlp.gate_proj.weight": (i, h),
            f"{p}.mlp.up_proj.weight": (i, h),
            f"{p}.mlp.down_proj.weight": (h, i),
        })
        if cfg.attention_bias:
            shapes.update({f"{p}.self_attn.q_proj.bias": (q,), f"{p}.self_attn.k_proj.bias": (kv,),
                           f"{p}.self_attn.v_proj.bias": (kv,)})
            if cfg.architecture != "qwen2":  # Llama's attention_bias covers o_proj too; Qwen2's never has one
                shapes[f"{p}.self_attn.o_proj.bias"] = (h,)
        if cfg.mlp_bias:
            shapes.update({f"{p}.mlp.gate_proj.bias": (i,), f"{p}.mlp.up_proj.bias": (i,),
                           f"{p}.mlp.down_proj.bias": (h,)})
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def canonical_name(name: str) -> str:
    """Checkpoint name -> HF CausalLM name: 'layers.0...' (a bare LlamaModel), 'model.model.layers.0...' and
    'model.layers.0...' all become 'model.layers.0...'; 'lm_head.weight' stays."""
    while name.startswith("model."):
        name = name[len("model."):]
    return name if name.startswith("lm_head.") else "model." + name


def check_tensors(found: dict[str, tuple[tuple[int, ...], str]], expected: dict[str, tuple[int, ...]],
                  source: str) -> None:
    """found: HF name -> (shape, file it is in). Raise ModelLoadError naming the file on a wrong shape, or
    naming `source` on missing tensors."""
    for name, (shape, where) in found.items():
        if name in expected and shape != expected[name]:
            raise ModelLoadError(f"{where}: tensor {name} has shape {list(shape)}, the config implies "
                                 f"{list(expected[name])}")
    missing = [n for n in expected if n not in found]
    if missing:
        raise ModelLoadError(f"{source}: {len(missing)} tensor(s) the config requires are missing: "
                             f"{', '.join(missing[:6])}" + (" ..." if len(missing) > 6 else ""))
