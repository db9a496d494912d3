"""One training forward: a padded batch through the served model with a trainable adapter -> loss.

    ids/labels [B, S], lengths [B]
      lora:   the model as served, the adapter in its linear seam
      prefix: every layer attends to the adapter's keys/values first; positions start at nvt
      prompt: the adapter's embeddings are prepended; labels get nvt ignored positions in front
    hidden [B, S', H] -> logits of the positions that predict a labelled token -> cross-entropy sum
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from server.model.attention import DenseAttention
from server.train.adapters import TrainablePrefix, TrainablePrompt
from server.train.data import IGNORE


def hidden_states(model, adapter, ids: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor | None = None,
                  checkpoint: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (hidden [B, S', H], labels [B, S'] aligned with it, or None)."""
    b, s = ids.shape
    dev = ids.device
    embeds, applier = None, None
    if isinstance(adapter, TrainablePrompt):
        n = adapter.nvt
        embeds = torch.cat([adapter.embedding.to(model.dtype).expand(b, -1, -1), model.embed_tokens(ids)], dim=1)
        s, lengths = s + n, lengths + n
        if labels is not None:
            labels = torch.cat([labels.new_full((b, n), IGNORE), labels], dim=1)
        positions = torch.arange(s, device=dev).expand(b, -1)
        attn = DenseAttention.build(lengths, s)
        embeds = embeds.reshape(b * s, -1)
    elif isinstance(adapter, TrainablePrefix):
        kv = adapter.kv()  # [2L, KVH, nvt, D]
        positions = adapter.nvt + torch.arange(s, device=dev).expand(b, -1)
        attn = DenseAttention.build(lengths, s, adapter.nvt, lambda i: (kv[2 * i][None], kv[2 * i + 1][None]))
    else:
        positions = torch.arange(s, device=dev).expand(b, -1)
        attn = DenseAttention.build(lengths, s)
        applier = adapter
    hidden = model(ids.reshape(-1), positions.reshape(-1), attn, adapters=applier, inputs_embeds=embeds,
                   checkpoint_layers=checkpoint)
    return hidden.view(b, s, -1), labels


def loss_sum(model, adapter, ids: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor,
             checkpoint: bool = False) -> tuple[torch.Tensor, int]:
    """-> (sum of token cross-entropies over labelled positions, number of them). Position t predicts t + 1."""
    hidden, labels = hidden_states(model, adapter, ids, lengths, labels, checkpoint)
    target = labels[:, 1:]
    keep = target != IGNORE
    logits = model.logits(hidden[:, :-1][keep])  # only the rows that are scored: [N, vocab] fp32
    return F.cross_entropy(logits, target[keep], reduction="sum"), int(keep.sum())


@torch.no_grad()
def real_token_logits(model, adapter, ids: torch.Tensor) -> torch.Tensor:
    """ids [B, S] (no padding) -> logits [B, S, vocab] at the real tokens' positions (for oracle tests)."""
    b, s = ids.shape
    lengths = torch.full((b,), s, dtype=torch.long, device=ids.device)
    hidden, _ = hidden_states(model, adapter, ids, lengths)
    return model.logits(hidden[:, -s:].reshape(b * s, -1)).view(b, s, -1)
