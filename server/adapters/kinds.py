"""Adapter kinds as types: what each kind needs from the server and what it adds to a step.

The kind is chosen once, from the config's peft_type, and reads the adapter (manager._read); everything
after asks the kind, never compares names. Four kinds, one small interface: `read` (disk -> the loaded
adapter and its host serving form), `uses_pool` (residency: device pages or not), `num_virtual_tokens`
and `applier` (what it adds to a step):
- LoraKind (LoRA, rsLoRA, DoRA, AdaLoRA): weights in device pool pages, applied per token by the SGMV
  batch; counted against --max-loras.
- PromptKind (prefix tuning, prompt tuning, P-tuning, multitask): virtual tokens at the front of the
  sequence, living in the KV cache (written or computed by the step, shared through the prefix cache).
- Ia3Kind: per-token scaling vectors in the linear seam.
- AdaptionKind (LLaMA-Adapter): gated attention to learned prompts in the top layers.
"""
from __future__ import annotations

from loader.adapters.adaption_prompt import load_adaption_prompt
from loader.adapters.ia3 import load_ia3_adapter
from loader.adapters.lora import load_lora_adapter
from loader.adapters.prompt_adapter import PROMPT_TYPES, load_prompt_adapter
from server.adapters.adaption_batch import AdaptionBatch
from server.adapters.ia3_batch import Ia3Batch
from server.adapters.layout import pack
from server.errors import AdapterLoadError


class AdapterKind:
    name = "adapter"
    uses_pool = False  # needs device pool pages before it can run (make_resident)
    counts_against_max_loras = False

    def read(self, mgr, adapter_id: str, path):
        """Disk -> (the loaded adapter, its host serving form); mgr: the AdapterManager (model, pool, limits)."""
        raise NotImplementedError

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

    def read(self, mgr, adapter_id, path):
        # read as stored, converted and checked once while packed
        adapter = load_lora_adapter(adapter_id, path, mgr.cfg, mgr.max_rank, mgr.model.linear_weight, None,
                                    check_finite=False)
        for m in adapter.modules.values():
            if m.dora_g is not None:  # applied to the base output, in the model's dtype
                m.dora_g = m.dora_g.to(mgr.dtype)
        # pinned host memory on CUDA: fast, asynchronous copies into the pool
        packed = pack(adapter, mgr.model, mgr.pool.page_size, pin=mgr.device.type == "cuda", dtype=mgr.pool.buffer.dtype)
        if packed.num_pages > mgr.pool.max_pages:
            raise AdapterLoadError("no_room", f"adapter {adapter_id!r} needs {packed.num_pages} pool pages "
                                   f"({adapter.nbytes / 2**20:.1f} MiB) but the pool has {mgr.pool.max_pages}: "
                                   "raise --adapter-memory")
        return adapter, packed

    def applier(self, runner, spans, num_tokens):
        return runner.lora_batch(runner.pool.buffer, spans, num_tokens, lambda e: e.device, runner.device)


class PromptKind(AdapterKind):
    name = "prompt"

    def read(self, mgr, adapter_id, path):
        a = load_prompt_adapter(adapter_id, path, mgr.cfg)
        why = mgr.prompt_kv_refusal(a.num_virtual_tokens) if mgr.prompt_kv_refusal else None
        if why:  # its virtual tokens could never fit the cache's adapter share
            raise AdapterLoadError("no_room", f"adapter {adapter_id!r} {why}")
        return a, a

    def num_virtual_tokens(self, host) -> int:
        return host.num_virtual_tokens


class Ia3Kind(AdapterKind):
    name = "ia3"

    def read(self, mgr, adapter_id, path):
        a = load_ia3_adapter(adapter_id, path, mgr.cfg)
        return a, a.to(mgr.device, mgr.dtype)

    def applier(self, runner, spans, num_tokens):
        return Ia3Batch.build(spans, lambda e: e.host)


class AdaptionKind(AdapterKind):
    name = "adaption"

    def read(self, mgr, adapter_id, path):
        a = load_adaption_prompt(adapter_id, path, mgr.cfg, mgr.model)
        return a, a

    def applier(self, runner, spans, num_tokens):
        return AdaptionBatch.build(spans, lambda e: e.host)


LORA, PROMPT, IA3, ADAPTION = LoraKind(), PromptKind(), Ia3Kind(), AdaptionKind()


def kind_for(peft_type: str) -> AdapterKind:
    """The kind that serves a config's peft_type (LoRA's loader refuses the types no kind serves, by name)."""
    t = peft_type.upper()
    return PROMPT if t in PROMPT_TYPES else IA3 if t == "IA3" else ADAPTION if t == "ADAPTION_PROMPT" else LORA
