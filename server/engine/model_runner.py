"""Turns a scheduled batch into model inputs, runs the forward pass, returns the sampling logits."""
from __future__ import annotations

import functools
import logging

import torch

from server.adapters.batch import LoraBatch, StepAdapters
from server.adapters.adaption_batch import AdaptionBatch
from server.adapters.ia3_batch import Ia3Batch
from server.adapters.kernel_batch import KernelLoraBatch, sgmv_ops
from server.adapters.manager import AdapterManager
from server.engine.scheduler import ScheduledBatch
from server.engine.sequence import Sequence
from server.model.attention import AttentionMetadata, PrefillChunk
from server.model.llama import LlamaModel

log = logging.getLogger("tessera.engine")


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, adapters: AdapterManager | None = None):
        cfg = model.config
        self.model = model
        self.adapters = adapters
        self.block_size = block_size
        self.device = model.device
        # [layers, K/V, slots, KVH, D]
        self.kv_cache = torch.zeros(cfg.num_hidden_layers, 2, num_blocks * block_size, cfg.num_key_value_heads,
                                    cfg.head_dim, dtype=model.dtype, device=model.device)
        model.bind_kv_cache(self.kv_cache, block_size)
        self._block_offsets = torch.arange(block_size)
        # the LoRA add: SGMV kernels (Triton on CUDA, C++ on the CPU), else pool views + BLAS (chosen once)
        ops = None if adapters is None else sgmv_ops(self.device, model.dtype, adapters.pool.buffer.dtype)
        if adapters is not None and ops is None:
            log.warning("no SGMV kernel for %s activations with a %s adapter pool on %s: using the per-segment "
                        "torch path", model.dtype, adapters.pool.buffer.dtype, self.device)
        self.lora_batch = functools.partial(KernelLoraBatch.build, ops=ops) if ops else LoraBatch.build

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor]:
        """Run one step. -> (sequences that sample a token now, their logits [N, vocab] fp32)."""
        input_ids, positions, attn, sample_rows, samplers = self._prepare(batch)
        lora = self._adapter_batch(batch, input_ids.numel())
        hidden = self.model(input_ids, positions, attn, adapters=lora)
        if not samplers:
            return [], hidden.new_empty(0, self.model.config.vocab_size, dtype=torch.float32)
        return samplers, self.model.logits(hidden[sample_rows])

    def _adapter_batch(self, batch: ScheduledBatch, num_tokens: int):
        """The step's adapter appliers for the linear seam (prompt-learning adapters act through the KV cache)."""
        if self.adapters is None or not any(s.adapter_id for s in batch.seqs):
            return None
        spans: dict[str, list] = {"lora": [], "ia3": [], "adaption": []}
        start = 0
        for seq, n in zip(batch.seqs, batch.num_tokens):
            family = self.adapters.family(seq.adapter_id) if seq.adapter_id else None
            if family in spans:
                spans[family].append((seq.adapter_id, start, n))
            start += n
        appliers = []
        if spans["lora"]:
            appliers.append(self.lora_batch(self.adapters.pool.buffer, spans["lora"], num_tokens,
                                                  self.adapters.resident, self.device))
        if spans["ia3"]:
            appliers.append(Ia3Batch.build(spans["ia3"], self.adapters.adapter))
        if spans["adaption"]:
            appliers.append(AdaptionBatch.build(spans["adaption"], self.adapters.adapter))
        return None if not appliers else appliers[0] if len(appliers) == 1 else StepAdapters(appliers)

    # -- shared KV prefixes (prompt-learning adapters, server/adapters/kv_prefix.py) ---------------
    @torch.inference_mode()
    def write_kv(self, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """kv [2 * layers, n, KVH, D] (row 2i keys, 2i + 1 values of layer i) into cache slots [n]."""
        cache = self.kv_cache.view(-1, *self.kv_cache.shape[2:])  # [layers * 2, slots, KVH, D]
        cache[:, slots.to(self.device)] = kv.to(self.device, self.kv_cache.dtype)

    @torch.inference_mode()
    def prefill_embeddings(self, embeds: torch.Tensor, slots: torch.Tensor) -> None:
        """Run embeds [n, hidden] as a sequence at positions 0 .. n - 1, keeping its K/V in `slots` [n]."""
        n = embeds.shape[0]
        slots = slots.to(self.device)
        attn = AttentionMetadata(slot_mapping=slots, num_decodes=0, decode_block_tables=None, decode_lens=None,
                                 prefills=[PrefillChunk(0, n, n, slots)])
        positions = torch.arange(n, device=self.device)
        self.model(positions, positions, attn, inputs_embeds=embeds.to(self.device, self.model.dtype))

    @torch.inference_mode()
    def copy_kv(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy every layer's K/V from cache slots src [n] to dst [n]."""
        self.kv_cache[:, :, dst.to(self.device)] = self.kv_cache[:, :, src.to(self.device)]

    def _prepare(self, batch: ScheduledBatch):
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slot_parts: list[torch.Tensor] = []
        sample_rows: list[int] = []
        samplers: list[Sequence] = []
        prefills: list[PrefillChunk] = []
        nd = batch.num_decodes
        dec_tables: list[list[int]] = []
        dec_lens: list[int] = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
            start, cached = len(ids), seq.num_cached_tokens
            ids.extend(seq.token_ids[seq.num_computed:seq.num_computed + n])
            first_pos = seq.position_offset + seq.num_computed
            pos.extend(range(first_pos, first_pos + n))
            table = torch.tensor(seq.block_table, dtype=torch.int64)
            ctx_slots = (table[:, None] * bs + self._block_offsets).flatten()[:cached + n]  # [ctx]
            slot_parts.append(ctx_slots[cached:])
            if i < nd:
                dec_tables.append(seq.block_table)
                dec_lens.append(cached + 1)
            else:
                prefills.append(PrefillChunk(start, n, cached + n, ctx_slots.to(self.device)))
            if seq.num_computed + n == len(seq.token_ids):
                sample_rows.append(start + n - 1)
                samplers.append(seq)
        dec_bt = dec_len = None
        if nd:
            width = max(len(t) for t in dec_tables)
            dec_bt = torch.tensor([t + [0] * (width - len(t)) for t in dec_tables], dtype=torch.int64).to(self.device)
            dec_len = torch.tensor(dec_lens, dtype=torch.int32).to(self.device)
        attn = AttentionMetadata(slot_mapping=torch.cat(slot_parts).to(self.device), num_decodes=nd,
                                 decode_block_tables=dec_bt, decode_lens=dec_len, prefills=prefills)
        input_ids = torch.tensor(ids, dtype=torch.int64, device=self.device)
        positions = torch.tensor(pos, dtype=torch.int64, device=self.device)
        return input_ids, positions, attn, torch.tensor(sample_rows, device=self.device), samplers
