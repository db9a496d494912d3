"""Prompt-learning adapters (PEFT): prefix tuning, prompt tuning, P-tuning, multitask prompt tuning.

All of them put `nvt` virtual tokens in front of every request's own tokens (../shared/PEFT_FORMAT.md):
- PREFIX_TUNING: `prompt_embeddings` [nvt, layers * 2 * kv_dim] are the keys/values themselves (the
  projection MLP, if any, already applied): per layer `view(nvt, 2L, kv_heads, head_dim)`, row 2i =
  layer i's keys (already "post-RoPE": never rotated), 2i + 1 its values.
- PROMPT_TUNING / P_TUNING: `prompt_embeddings` [nvt, hidden] are input embeddings (P-tuning stores its
  encoder's output); their keys/values come from a prefill at positions 0 .. nvt - 1.
- MULTITASK_PROMPT_TUNING: task t's embeddings = prompt_embeddings * (prefix_task_cols[t] @ prefix_task_rows[t]).
In every case the real tokens sit at positions nvt, nvt + 1, ... and attend to all virtual tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from loader.adapters.adapter_config import ConfigProblems
from server.errors import AdapterLoadError
from loader.config import ModelConfig
from loader.adapters.lora import read_adapter_config, read_safetensors

PROMPT_TYPES = {"PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt", "P_TUNING": "p_tuning",
                "MULTITASK_PROMPT_TUNING": "multitask"}
_KNOWN = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "num_virtual_tokens",
          "token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers", "encoder_hidden_size",
          "prefix_projection", "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
          "tokenizer_kwargs", "encoder_reparameterization_type", "encoder_num_layers", "encoder_dropout",
          "num_tasks", "num_ranks", "prompt_tuning_init_state_dict_path", "prompt_tuning_init_task",
          "auto_mapping", "peft_version", "modules_to_save"}


@dataclass
class PromptAdapter:
    adapter_id: str
    path: Path
    kind: str  # prefix | prompt | p_tuning | multitask
    num_virtual_tokens: int
    table: torch.Tensor  # prefix: [nvt, L * 2 * kv_dim]; otherwise [nvt, hidden] embeddings
    task_cols: torch.Tensor | None = None  # multitask: [tasks, nvt, ranks]
    task_rows: torch.Tensor | None = None  # multitask: [tasks, ranks, hidden]

    @property
    def rank(self) -> int:
        return self.num_virtual_tokens

    @property
    def num_tasks(self) -> int:
        return 1 if self.task_cols is None else self.task_cols.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.table, self.task_cols, self.task_rows) if t is not None)

    def embeddings(self, task: int) -> torch.Tensor:
        """[nvt, hidden] input embeddings of the virtual tokens (prompt-like kinds)."""
        if self.task_cols is None:
            return self.table
        return self.table * (self.task_cols[task] @ self.task_rows[task])

    def prefix_kv(self, cfg: ModelConfig) -> torch.Tensor:
        """prefix kind: [2 * layers, nvt, kv_heads, head_dim] (row 2i keys, 2i + 1 values of layer i)."""
        n = self.num_virtual_tokens
        return self.table.view(n, 2 * cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim).transpose(0, 1)


def load_prompt_adapter(adapter_id: str, path: Path, model: ModelConfig) -> PromptAdapter:
    d = read_adapter_config(path)
    kind = PROMPT_TYPES[d["peft_type"].upper()]
    name = path.name
    p = ConfigProblems(f"{name}/adapter_config.json")
    p.unknown_fields(d, _KNOWN)
    if d.get("task_type") not in (None, "CAUSAL_LM"):
        p.unserved(f"task_type {d['task_type']!r} (only CAUSAL_LM is served)")
    if d.get("modules_to_save"):
        p.unserved("modules_to_save is not supported")
    nvt = d.get("num_virtual_tokens")
    if nvt is None:
        p.bad("num_virtual_tokens", "missing")
    nvt = p.integer(d, "num_virtual_tokens")
    if p.integer(d, "num_transformer_submodules") not in (None, 1):
        p.bad("num_transformer_submodules", f"{d['num_transformer_submodules']} (decoder-only models have 1)")
    token_dim = p.integer(d, "token_dim")
    num_layers = p.integer(d, "num_layers")
    for field in ("num_attention_heads", "encoder_hidden_size", "encoder_num_layers"):  # informational
        p.integer(d, field)
    p.flag(d, "prefix_projection")
    num_tasks = p.integer(d, "num_tasks") if kind == "multitask" else None
    num_ranks = p.integer(d, "num_ranks") if kind == "multitask" else None
    p.raise_any()
    if num_layers not in (None, model.num_hidden_layers):
        raise AdapterLoadError("incompatible", f"{name}: made for {num_layers} layers, the base model has "
                               f"{model.num_hidden_layers}")
    tensors = read_safetensors(path)
    kv_dim = model.num_key_value_heads * model.head_dim
    dim = kv_dim if kind == "prefix" else model.hidden_size  # PEFT's token_dim for this model
    width = model.num_hidden_layers * 2 * kv_dim if kind == "prefix" else model.hidden_size
    table = tensors.get("prompt_embeddings")
    if table is None:
        raise AdapterLoadError("invalid", f"{name}: prompt_embeddings is missing (tensors: {sorted(tensors)[:5]})")
    if table.dim() != 2 or table.shape[0] != nvt:
        raise AdapterLoadError("invalid", f"{name}: prompt_embeddings {tuple(table.shape)} is not "
                               f"(num_virtual_tokens={nvt}, width)")
    if table.shape[1] != width:
        raise AdapterLoadError("incompatible", f"{name}: prompt_embeddings {tuple(table.shape)}, expected "
                               f"({nvt}, {width}) for this base model (made for another model?)")
    if token_dim not in (None, dim):
        raise AdapterLoadError("invalid", f"{name}: token_dim: {token_dim} disagrees with prompt_embeddings "
                               f"{tuple(table.shape)} (token dimension {dim})")
    extra = set(tensors) - {"prompt_embeddings", "prefix_task_cols", "prefix_task_rows"}
    if extra:
        raise AdapterLoadError("invalid", f"{name}: unexpected tensors {sorted(extra)[:5]}")
    cols = rows = None
    if kind == "multitask":
        cols, rows = tensors.get("prefix_task_cols"), tensors.get("prefix_task_rows")
        if cols is None or rows is None or cols.dim() != 3 or rows.dim() != 3 or cols.shape[1] != nvt \
                or rows.shape[2] != model.hidden_size or cols.shape[0] != rows.shape[0] or cols.shape[2] != rows.shape[1]:
            raise AdapterLoadError("invalid", f"{name}: prefix_task_cols / prefix_task_rows missing or of the wrong "
                                   "shape ([tasks, nvt, ranks] / [tasks, ranks, hidden])")
        for field, want, got in (("num_tasks", num_tasks, cols.shape[0]), ("num_ranks", num_ranks, cols.shape[2])):
            if want not in (None, got):
                raise AdapterLoadError("invalid", f"{name}: {field}: {want} disagrees with prefix_task_cols "
                                       f"{tuple(cols.shape)}")
        cols, rows = cols.float(), rows.float()
    out = PromptAdapter(adapter_id, path, kind, nvt, table.float(), cols, rows)
    if not all(torch.isfinite(t).all() for t in (out.table, cols, rows) if t is not None):
        raise AdapterLoadError("invalid", f"{name}: NaN or infinite values")
    return out
