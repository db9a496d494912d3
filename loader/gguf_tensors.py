"""GGUF tensors -> Hugging Face-named fp32 torch tensors.

Reading (`read_gguf_tensor`: the stored bytes, no copy) is kept apart from dequantizing so that a packed
Q4/Q8 path can take the raw blocks instead. Every step is row-wise along the output dimension: a GGML block
never spans two rows, so the q/k row permutation can be undone on packed rows too.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize
from tqdm import tqdm

from kernels.quant import QuantizedWeight, from_ggml_blocks
from loader.config import ModelConfig
from server.errors import ModelLoadError
from loader.names import check_tensors, expected_shapes

log = logging.getLogger("tessera.loader")

_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def hf_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None for a tensor we do not map."""
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER:
        return f"model.layers.{parts[1]}.{_LAYER[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP:
        return f"{_TOP[parts[0]]}.{parts[1]}"
    return None


def read_gguf_tensor(t: ReaderTensor) -> tuple[np.ndarray, GGMLQuantizationType, tuple[int, ...]]:
    """-> (the stored data as a memmap view: values for F32/F16, uint8 blocks [rows, bytes] for quantized types,
    its GGML type, the logical shape in HF order). GGUF lists dims innermost first: [in, out] -> (out, in)."""
    return t.data, t.tensor_type, tuple(int(d) for d in reversed(t.shape.tolist()))


def dequantize_gguf(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...], name: str) -> np.ndarray:
    """Semantics: the fp32 values the stored blocks encode, shaped `shape` (gguf's reference dequantizer)."""
    try:
        values = dequantize(raw, qtype)
    except NotImplementedError as e:
        raise ModelLoadError(f"tensor {name} has GGML type {qtype.name}, which the installed gguf package cannot "
                             f"dequantize (F32, F16, BF16, Q4_0, Q4_1, Q5_x, Q8_0, K- and IQ-quants can)") from e
    return values.astype(np.float32, copy=False).reshape(shape)


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation (convert_hf_to_gguf `LlamaModel.permute`), as transformers does.

    Semantics: per head of d rows, GGUF row 2*j + h holds HF row h * d/2 + j (h in {0, 1}, j < d/2), i.e. the
    rotary halves are interleaved. w: [n_head * d, ...] -> same shape in HF's half-split order.
    """
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_heads(cfg: ModelConfig, name: str) -> int | None:
    """How many heads to un-permute `name` (HF) by: llama-architecture q and k only (Qwen2 is not permuted)."""
    if cfg.architecture != "llama":
        return None
    proj = name.split(".")[-2]  # model.layers.<i>.self_attn.<proj>.<weight|bias>
    return {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(proj)


PACKED_TYPES = {GGMLQuantizationType.Q4_0: "Q4_0", GGMLQuantizationType.Q4_1: "Q4_1", GGMLQuantizationType.Q8_0: "Q8_0"}
_LINEAR = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight", "up_proj.weight",
           "down_proj.weight")
_PACKED = (*_LINEAR, "embed_tokens.weight")  # the embedding: a tied LM head is served from its packed values


def load_gguf_weights(reader: GGUFReader, cfg: ModelConfig, path: Path,
                      keep_quantized: bool = False) -> dict[str, torch.Tensor | QuantizedWeight]:
    """Every tensor `cfg` needs, q/k un-permuted, HF-named, in the config's order: dequantized to fp32, or,
    with keep_quantized, linear weights (and the embedding) stored as Q4_0/Q4_1/Q8_0 converted losslessly to
    QuantizedWeight."""
    expected = expected_shapes(cfg)
    located: dict[str, ReaderTensor] = {}
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    skipped = []
    for t in reader.tensors:
        name = hf_name(t.name)
        if name in expected:
            located[name] = t
            found[name] = (read_gguf_tensor(t)[2], f"{path} ({t.name})")
        else:
            skipped.append(t.name)
    check_tensors(found, expected, str(path))
    if skipped:
        log.warning("%s: ignoring %d tensor(s) the config does not use: %s", path.name, len(skipped),
                    ", ".join(skipped[:6]))
    weights: dict[str, torch.Tensor | QuantizedWeight] = {}
    for name in tqdm(expected, desc=f"reading {path.name}", unit="tensor", leave=False, disable=None):
        raw, qtype, shape = read_gguf_tensor(located[name])
        if keep_quantized and qtype in PACKED_TYPES and name.endswith(_PACKED) and shape[1] % 32 == 0:
            blocks = np.ascontiguousarray(raw).reshape(shape[0], -1)  # [out, bytes]: blocks never span rows
            if (n_head := rope_heads(cfg, name)) is not None:
                blocks = unpermute_rope_rows(blocks, n_head)
            weights[name] = from_ggml_blocks(torch.from_numpy(np.array(blocks)), PACKED_TYPES[qtype], shape[1])
            continue
        values = dequantize_gguf(raw, qtype, shape, f"{located[name].name} in {path}")
        if (n_head := rope_heads(cfg, name)) is not None:
            values = unpermute_rope_rows(values, n_head)
        if not values.flags.writeable:  # F32: a view of the read-only memmap
            values = np.array(values)
        weights[name] = torch.from_numpy(values)
    return weights
