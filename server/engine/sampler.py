"""Token selection for a batch of sequences with different sampling settings.

Processing order follows transformers' `generate`: repetition penalty -> presence/frequency penalties
(OpenAI's, over the generated tokens) -> tokens banned by min_tokens -> temperature -> the structured-output
mask (one token bitmask for every constrained row, structured.py) -> top-k -> top-p, then greedy argmax or a
draw. Greedy rows share one batched argmax. Sampled rows draw from their own
`torch.Generator`, so a seeded request produces the same tokens whatever else shares its batch.
Logprobs (when asked) are log-softmax of the logits after penalties, temperature and the structured-output
mask, before the top-k/top-p filters;
top_logprobs are the k largest of those.

Fault isolation: a row whose logits are not finite, or whose own processing fails, gets an error in
`SamplerOutput.errors` and every other row is sampled as usual; the batch never fails for one row.
Temperature divides logits shifted by their row maximum, so any positive temperature (down to the
smallest float) gives a finite distribution.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import torch

from server.engine.request import SamplingParams
from server.engine.structured import apply_masks

log = logging.getLogger("tessera.engine")


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


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64 on the CPU (rows in `errors`: meaningless)
    logprobs: torch.Tensor | None  # [B] fp32 on the CPU, when any row asked
    top_ids: torch.Tensor | None = None  # [B, K] int64, K = the largest top_logprobs asked in the batch
    top_logprobs: torch.Tensor | None = None  # [B, K] fp32
    errors: dict[int, str] = field(default_factory=dict)  # row -> why that row could not be sampled


def apply_repetition_penalty(logits: torch.Tensor, token_ids: list[int], penalty: float) -> torch.Tensor:
    """One row [V] -> a new row, HF semantics: seen tokens' positive logits / penalty, negative * penalty."""
    if penalty == 1.0 or not token_ids:
        return logits
    ids = torch.tensor(sorted(set(token_ids)), device=logits.device)
    seen = logits.index_select(0, ids)
    return logits.index_copy(0, ids, torch.where(seen < 0, seen * penalty, seen / penalty))


def apply_presence_frequency(logits: torch.Tensor, output_ids: list[int], presence: float,
                             frequency: float) -> torch.Tensor:
    """One row [V] -> a new row, OpenAI semantics: logit[t] -= frequency * count(t) + presence * (count(t) > 0)."""
    if not output_ids or (presence == 0.0 and frequency == 0.0):
        return logits
    ids, counts = torch.unique(torch.tensor(output_ids, device=logits.device), return_counts=True)
    return logits.index_add(0, ids, -(frequency * counts.to(logits.dtype) + presence))


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """One row [V] / temperature, shifted so its maximum is 0 (same softmax; finite for any t > 0)."""
    if temperature == 1.0:
        return logits
    return (logits - logits.max()) / temperature


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
    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, states: list[SamplingState], token_ids: list[list[int]],
                 output_ids: list[list[int]] | None = None,
                 banned: list[tuple[int, ...]] | None = None, grammars: list | None = None) -> SamplerOutput:
        """logits [B, V] -> the next token of every row, their logprobs, and the rows that failed.

        token_ids: each row's prompt + generated tokens (repetition penalty); output_ids: its generated tokens
        (presence/frequency penalties; default token_ids); banned: token ids a row may not sample now;
        grammars: each row's GrammarState or None (structured output: the tokens it allows)."""
        logits = logits.float()
        output_ids = output_ids if output_ids is not None else token_ids
        errors: dict[int, str] = {}
        bad = _nonfinite_rows(logits)
        for i in bad:
            errors[i] = "the model produced non-finite logits for this sequence"
        rows: dict[int, torch.Tensor] = {}  # processed rows that differ from the raw logits
        for i, st in enumerate(states):
            p = st.params
            ban = banned[i] if banned is not None else ()
            if i in errors or not (ban or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
                                   or not (p.greedy or p.temperature == 1.0)):
                continue
            try:
                row = apply_repetition_penalty(logits[i], token_ids[i], p.repetition_penalty)
                row = apply_presence_frequency(row, output_ids[i], p.presence_penalty, p.frequency_penalty)
                if row is not logits[i]:  # an extreme penalty (1e-300) must not overflow a logit to inf
                    row = row.clamp(-torch.finfo(row.dtype).max, torch.finfo(row.dtype).max)
                if ban:
                    row = row.index_fill(0, torch.tensor(ban, device=row.device), float("-inf"))
                rows[i] = row if p.greedy else apply_temperature(row, p.temperature)
            except Exception as exc:  # this row's settings only: the others go on
                errors[i] = _row_error(i, "penalties/temperature", exc)
        if rows:
            logits = logits.clone()
            for i, row in rows.items():
                logits[i] = row
        if grammars is not None and any(g is not None for g in grammars):
            if not rows:
                logits = logits.clone()
            errors.update(apply_masks(logits, [None if i in errors else g for i, g in enumerate(grammars)]))
        next_ids = logits.argmax(dim=-1)
        for i, st in enumerate(states):
            if st.generator is None or i in errors:
                continue
            try:
                row = top_k_top_p_filter(logits[i], st.params.top_k, st.params.top_p)
                next_ids[i] = torch.multinomial(row.softmax(-1), 1, generator=st.generator)[0]
            except Exception as exc:
                errors[i] = _row_error(i, "sampling", exc)
        out = SamplerOutput(next_ids.cpu(), None, errors=errors)
        if any(st.params.logprobs for st in states):
            lsm = logits.log_softmax(-1)
            out.logprobs = lsm.gather(1, next_ids.unsqueeze(1)).squeeze(1).cpu()
            k = max(st.params.top_logprobs for st in states)
            if k:
                top = lsm.topk(min(k, lsm.shape[-1]), dim=-1)
                out.top_logprobs, out.top_ids = top.values.cpu(), top.indices.cpu()
        return out


def _nonfinite_rows(logits: torch.Tensor) -> list[int]:
    """Rows with a NaN or an infinity. A row sum is non-finite whenever the row is (NaN and inf propagate), so
    one reduction screens the batch and only suspect rows (a finite row whose sum overflows, too) are checked
    element by element: a fifth of the cost of isfinite over [B, V] (3 against 16 ms at 64 x 49152 here)."""
    suspect = (~torch.isfinite(logits.sum(dim=-1))).nonzero().flatten().tolist()
    return [i for i in suspect if not bool(torch.isfinite(logits[i]).all())]


def _row_error(row: int, stage: str, exc: Exception) -> str:
    log.exception("sampler: row %d failed in %s", row, stage)
    return f"internal error while sampling this sequence ({stage}: {type(exc).__name__}: {exc})"
