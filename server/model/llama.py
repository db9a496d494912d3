"""One Llama-family model (Llama 2/3, Mistral, Qwen2, SmolLM) for serving, adapters and training.

Tokens of all sequences in a step are flattened into one list: x is [T, hidden]. Attention reads
and writes the paged KV cache through `AttentionMetadata`; every projection is a `Linear` seam.
"""
from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from kernels.quant import QuantizedWeight, ref_dequantize
from kernels.quant_matmul import quant_linear_for, quant_linear_with_grad
from loader.config import ModelConfig
from server.model.attention import AttentionMetadata, DenseAttention, dense_attention, paged_attention, write_kv
from server.model.layers import RMSNorm, RotaryEmbedding, apply_rotary, silu_and_mul
from server.model.linear import AdapterApplier, Linear
from server.model.rope import rope_parameters


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim ** -0.5
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, {"q_proj": q, "k_proj": kv, "v_proj": kv}, cfg.attention_bias,
                               layer_idx=layer_idx, dtype=dtype, device=device)
        o_bias = cfg.attention_bias and cfg.architecture == "llama"  # Qwen2 biases only q/k/v
        self.o_proj = Linear(q, {"o_proj": cfg.hidden_size}, o_bias, layer_idx=layer_idx, dtype=dtype, device=device)
        self.k_cache: torch.Tensor | None = None  # [slots, KVH, D], bound by bind_kv_cache
        self.v_cache: torch.Tensor | None = None
        self.block_size = 0

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attn: AttentionMetadata,
                adapters: AdapterApplier | None) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x, adapters)
        q, k, v = qkv.split([self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                             self.num_kv_heads * self.head_dim], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, k, *rope)
        if isinstance(attn, DenseAttention):  # training: no cache
            o = dense_attention(q, k, v, attn, self.layer_idx, self.scale)
        else:
            write_kv(self.k_cache, self.v_cache, k, v, attn.slot_mapping)
            o = paged_attention(q, self.k_cache, self.v_cache, attn, self.block_size, self.scale)
        out = self.o_proj(o.reshape(t, -1), adapters)
        return out if adapters is None else adapters.attention(self, q, out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        i = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, {"gate_proj": i, "up_proj": i}, cfg.mlp_bias,
                                   layer_idx=layer_idx, dtype=dtype, device=device)
        self.down_proj = Linear(i, {"down_proj": cfg.hidden_size}, cfg.mlp_bias,
                                layer_idx=layer_idx, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, adapters: AdapterApplier | None) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x, adapters)), adapters)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = Attention(cfg, layer_idx, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = MLP(cfg, layer_idx, dtype, device)

    def forward(self, x, rope, attn, adapters):
        x = x + self.self_attn(self.input_layernorm(x), rope, attn, adapters)
        return x + self.mlp(self.post_attention_layernorm(x), adapters)


class LlamaModel(nn.Module):
    """forward(input_ids [T], positions [T], attn) -> hidden [T, hidden]; logits(hidden) -> [N, vocab]."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.config = cfg
        self.dtype = dtype
        self.device = device
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, dtype, device) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, device=device))
        if self.lm_head is not None:
            self.lm_head.weight.requires_grad_(False)
        self.packed_embedding: QuantizedWeight | None = None  # the GGUF's int8/int4 embedding, as loaded
        self.head_q: QuantizedWeight | None = None  # the tied LM head served from it (quantize "auto")
        self._head_qmatmul = None
        inv_freq, scaling = rope_parameters(cfg)
        self.rope = RotaryEmbedding(inv_freq, scaling, cfg.max_position_embeddings, device)
        for i, lin in enumerate(self.linears()):
            lin.key = i  # row of per-adapter kernel descriptors (kernels/lora.py)

    @classmethod
    def from_loaded(cls, loaded, dtype: torch.dtype, device: torch.device, quantize: str = "auto",
                    group_size: int = 128) -> "LlamaModel":
        """The model the server runs (and the trainer trains on): weights in, linear layers quantized."""
        model = cls(loaded.config, dtype, device)
        model.load_weights(loaded.weights)
        model.eval()
        model.quantize(quantize, group_size)
        return model

    def bind_kv_cache(self, kv_cache: torch.Tensor, block_size: int) -> None:
        """kv_cache: [layers, 2, num_blocks * block_size, KVH, D], allocated by the engine."""
        for i, layer in enumerate(self.layers):
            layer.self_attn.k_cache = kv_cache[i, 0]
            layer.self_attn.v_cache = kv_cache[i, 1]
            layer.self_attn.block_size = block_size

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata | DenseAttention,
                adapters: AdapterApplier | None = None, inputs_embeds: torch.Tensor | None = None,
                checkpoint_layers: bool = False) -> torch.Tensor:
        """checkpoint_layers: recompute each layer in backward (training's gradient checkpointing)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        rope = self.rope(positions, x.dtype)
        for layer in self.layers:
            if checkpoint_layers and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, rope, attn, adapters, use_reentrant=False)
            else:
                x = layer(x, rope, attn, adapters)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] (only the rows that sample) -> [N, vocab] in fp32."""
        if self.head_q is not None:  # the same weight values as the dequantized embedding, 4x fewer bytes
            if hidden.requires_grad and torch.is_grad_enabled():
                return quant_linear_with_grad(self._head_qmatmul, hidden, self.head_q, None).float()
            return self._head_qmatmul(hidden, self.head_q).float()
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return torch.nn.functional.linear(hidden, weight).float()

    def linear(self, layer: int, module: str) -> Linear:
        """The fused Linear that holds HF module `module` ('q_proj', ..., 'down_proj') of a layer."""
        block, attr = _FUSED[module]
        return getattr(getattr(self.layers[layer], block), attr)

    def linear_weight(self, layer: int, module: str) -> torch.Tensor:
        """The served [out, in] weight of one HF module (dequantized if the base is quantized)."""
        return self.linear(layer, module).slice_weight(module)

    def linears(self) -> list[Linear]:
        return [m for m in self.modules() if isinstance(m, Linear)]

    @property
    def weight_bytes(self) -> int:
        """Resident bytes of all weights (quantized linear layers at their packed size)."""
        dense = sum(p.numel() * p.element_size() for p in self.parameters())
        head = self.head_q.nbytes if self.head_q is not None else 0
        return dense + head + sum(lin.qweight.nbytes for lin in self.linears() if lin.qweight is not None)

    def quantize(self, method: str, group_size: int = 128) -> None:
        """Every linear layer (not embeddings, norms or the LM head) to `method`: int4 | int8 | none | auto.

        auto keeps what was loaded (GGUF Q4/Q8 stay packed, dense stays dense); a tied LM head whose
        GGUF embedding was Q8_0/Q4_x is then served from those packed values (the lookup stays dense).
        Runs once, after loading: the packed embedding is dropped when the head does not use it."""
        tied_packed = method == "auto" and self.lm_head is None and self.packed_embedding is not None
        self.head_q = self.packed_embedding.to(self.device) if tied_packed else None
        self._head_qmatmul = quant_linear_for(self.device) if tied_packed else None
        self.packed_embedding = self.head_q
        for lin in self.linears():
            if method == "none":
                lin.dequantize_(self.dtype)
            elif method in ("int4", "int8"):
                lin.quantize_(4 if method == "int4" else 8, group_size)
            elif method != "auto":
                raise ValueError(f"quantization must be auto, none, int4 or int8, got {method!r}")

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy Hugging Face-named tensors into the fused layout; every parameter must be covered."""
        loaded: set[str] = set()
        with torch.no_grad():
            for name, tensor in weights.items():
                target = self._load_one(name, tensor)
                loaded.add(target)
        missing = [n for n, _ in self.named_parameters() if n not in loaded and not _covered(n, loaded)]
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {', '.join(missing[:8])}"
                             + (" ..." if len(missing) > 8 else ""))

    def _load_one(self, name: str, tensor: torch.Tensor) -> str:
        parts = name.split(".")
        if name == "lm_head.weight":
            if self.lm_head is None:
                return "lm_head.weight"  # tied: the checkpoint repeats the embedding
            self.lm_head.weight.copy_(tensor)
            return name
        if parts[0] != "model":
            raise ValueError(f"unexpected weight {name!r}")
        if name == "model.embed_tokens.weight" and isinstance(tensor, QuantizedWeight):
            self.packed_embedding = tensor
            tensor = ref_dequantize(tensor, self.dtype)
        if name in ("model.embed_tokens.weight", "model.norm.weight"):
            self.get_parameter(name[len("model."):]).copy_(tensor)
            return name[len("model."):]
        if parts[1] != "layers" or len(parts) < 5:
            raise ValueError(f"unexpected weight {name!r}")
        layer = self.layers[int(parts[2])]
        module, leaf = parts[3], parts[-1]
        if module in ("input_layernorm", "post_attention_layernorm"):
            getattr(layer, module).weight.copy_(tensor)
            return f"layers.{parts[2]}.{module}.weight"
        proj = parts[4]
        if proj not in _FUSED:
            raise ValueError(f"unexpected weight {name!r}")
        fused = self.linear(int(parts[2]), proj)
        if leaf == "weight":
            fused.load_slice(proj, tensor)
        else:
            start, end = fused.slice_offsets[proj]
            fused.bias[start:end].copy_(tensor)
        return f"{name}"


_FUSED = {"q_proj": ("self_attn", "qkv_proj"), "k_proj": ("self_attn", "qkv_proj"),
          "v_proj": ("self_attn", "qkv_proj"), "o_proj": ("self_attn", "o_proj"),
          "gate_proj": ("mlp", "gate_up_proj"), "up_proj": ("mlp", "gate_up_proj"), "down_proj": ("mlp", "down_proj")}


def _covered(param_name: str, loaded: set[str]) -> bool:
    """A fused parameter is covered when all the HF tensors of its slices were loaded."""
    parts = param_name.split(".")  # layers.i.self_attn.qkv_proj.weight
    if len(parts) != 5:
        return False
    i, sub, fused, leaf = parts[1], parts[2], parts[3], parts[4]
    slices = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
              "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}[fused]
    return all(f"model.layers.{i}.{sub}.{s}.{leaf}" in loaded for s in slices)
