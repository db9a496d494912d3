"""Token selection for a batch of sequences with different sampling settings.

Processing order follows transformers' `generate`: repetition penalty -> temperature -> top-k -> top-p,
then greedy argmax or a draw. Greedy rows share one batched argmax. Sampled rows draw from their own
`torch.Generator`, so a seeded request produces the same tokens whatever else shares its batch.
Logprobs (when asked) are log-softmax of the logits after penalty and temperature, before the filters.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from server.engine.request import SamplingParams


@dataclass
class SamplingState:
    params: SamplingParams
    generator: torch.Generator | None  # None for greedy requests

    @classmethod
    def create(cls, params: SamplingParams, device: torch.device) -> "SamplingState":
        if params.greedy:
            return cls(params, None)
        g = torch.Generator(device=device)
        g.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        return cls(params, g)


def apply_repetition_penalty(logits: torch.Tensor, token_ids: list[int], penalty: float) -> None:
    """In place on one row, HF semantics: seen tokens' positive logits / penalty, negative * penalty."""
    if penalty == 1.0 or not token_ids:
        return
    ids = torch.tensor(sorted(set(token_ids)), device=logits.device)
    seen = logits.index_select(0, ids)
    logits.index_copy_(0, ids, torch.where(seen < 0, seen * penalty, seen / penalty))


def top_k_top_p_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """One row [V]: tokens outside the top-k / nucleus set to -inf (at least one token always kept)."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= (1.0 - top_p)
        remove[-1] = False  # keep the most likely token
        logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return logits


class Sampler:
    def __call__(self, logits: torch.Tensor, states: list[SamplingState],
                 token_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits [B, V] fp32 -> (next token ids [B] on the CPU, logprobs of those tokens [B] or None)."""
        logits = logits.float()
        for i, st in enumerate(states):
            apply_repetition_penalty(logits[i], token_ids[i], st.params.repetition_penalty)
        temps = [st.params.temperature if not st.params.greedy else 1.0 for st in states]
        if any(t != 1.0 for t in temps):
            logits = logits / torch.tensor(temps, device=logits.device, dtype=logits.dtype).unsqueeze(1)
        next_ids = logits.argmax(dim=-1)
        for i, st in enumerate(states):
            if st.generator is None:
                continue
            row = top_k_top_p_filter(logits[i], st.params.top_k, st.params.top_p)
            probs = row.softmax(-1)
            next_ids[i] = torch.multinomial(probs, 1, generator=st.generator)[0]
        logprobs = None
        if any(st.params.logprobs for st in states):
            logprobs = logits.log_softmax(-1).gather(1, next_ids.unsqueeze(1)).squeeze(1).cpu()
        return next_ids.cpu(), logprobs
