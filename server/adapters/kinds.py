"""Adapter kinds as types: what each kind needs from the server and what it adds to a step.

The kind is chosen once, when the adapter is read (manager._read); everything after asks the kind, never
compares names. Four kinds:
- LoraKind (LoRA, rsLoRA, DoRA, AdaLoRA): weights in device pool pages, applied per token by the SGMV
  batch; counted against --max-loras.
- PromptKind (prefix tuning, prompt tuning, P-tuning, multitask): virtual tokens at the front of the
  sequence, living in the KV cache (written or computed by the step, shared through the prefix cache).
- Ia3Kind: per-token scaling vectors in the linear seam.
- AdaptionKind (LLaMA-Adapter): gated attention to learned prompts in the top layers.
"""
from __future__ import annotations

from server.adapters.adaption_batch import AdaptionBatch
from server.adapters.ia3_batch import Ia3Batch


class AdapterKind:
    name = "adapter"
    uses_pool = False  # needs device pool pages before it can run (make_resident)
    counts_against_max_loras = False

    def num_virtual_tokens(self, host) -> int:
        """Cache positions ahead of the request's tokens."""
        return 0

    def applier(self, runner, spans: list, num_tokens: int):
        """The step's applier for the linear seam over spans [(entry, first row, rows)], or None."""
        return None

    def __repr__(self) -> str:
        return f"<{self.name} adapters>"


class LoraKind(AdapterKind):
    name = "lora"
    uses_pool = True
    counts_against_max_loras = True

    def applier(self, runner, spans, num_tokens):
        return runner.lora_batch(runner.pool.buffer, spans, num_tokens, lambda e: e.device, runner.device)


class PromptKind(AdapterKind):
    name = "prompt"

    def num_virtual_tokens(self, host) -> int:
        return host.num_virtual_tokens


class Ia3Kind(AdapterKind):
    name = "ia3"

    def applier(self, runner, spans, num_tokens):
        return Ia3Batch.build(spans, lambda e: e.host)


class AdaptionKind(AdapterKind):
    name = "adaption"

    def applier(self, runner, spans, num_tokens):
        return AdaptionBatch.build(spans, lambda e: e.host)


LORA, PROMPT, IA3, ADAPTION = LoraKind(), PromptKind(), Ia3Kind(), AdaptionKind()
