"""Logits for every position of a long text through the engine's own model and paged KV cache."""
from __future__ import annotations

import math

import torch

from server.engine.engine import LLMEngine
from server.engine.request import SamplingParams
from server.engine.scheduler import ScheduledBatch
from server.engine.sequence import Sequence


@torch.inference_mode()
def all_logits(engine: LLMEngine, ids: list[int], chunk: int = 512) -> torch.Tensor:
    """[len(ids), vocab] fp32: prefill in chunks through the paged cache, every row's logits kept."""
    seq = Sequence("ppl", ids, SamplingParams(max_new_tokens=1))
    out = []
    try:
        while seq.num_computed < len(ids):
            n = min(chunk, len(ids) - seq.num_computed)
            engine.blocks.grow(seq, n)
            step = engine.runner._prepare(ScheduledBatch([seq], [n]))
            hidden = engine.model(step.input_ids, step.positions, step.attn)
            out.append(engine.model.logits(hidden))
            seq.num_computed += n
    finally:
        engine.blocks.free(seq)
    return torch.cat(out)


def perplexity(engine: LLMEngine, ids: list[int]) -> float:
    logits = all_logits(engine, ids)
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="mean")
    return math.exp(nll.item())
