"""Turns a scheduled batch into model inputs, runs the forward pass, returns the sampling logits."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch

from server import hugepages
from server.adapters.batch import LoraBatch, StepAdapters
from server.adapters.kernel_batch import KernelLoraBatch, sgmv_ops
from server.adapters.pool import PagePool
from server.engine.scheduler import ScheduledBatch
from server.engine.sequence import Sequence
from server.model.attention import AttentionMetadata, PrefillChunk
from server.model.llama import LlamaModel

log = logging.getLogger("tessera.engine")


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, pool: PagePool | None = None):
        cfg = model.config
        self.model = model
        self.block_size = block_size
        self.device = model.device
        # [layers, K/V, slots, KVH, D]
        self.kv_cache = hugepages.zeros((cfg.num_hidden_layers, 2, num_blocks * block_size, cfg.num_key_value_heads,
                                         cfg.head_dim), model.dtype, model.device, "KV cache")
        model.bind_kv_cache(self.kv_cache, block_size)
        self._block_offsets = torch.arange(block_size)
        self.attach_pool(pool)

    def attach_pool(self, pool: PagePool | None) -> None:
        """The adapter pool LoRA batches read (set later when it views this runner's KV cache)."""
        self.pool = pool
        # the LoRA add: SGMV kernels (Triton on CUDA, C++ on the CPU), else pool views + BLAS (chosen once)
        ops = None if pool is None else sgmv_ops(self.device, self.model.dtype, pool.buffer.dtype)
        if pool is not None and ops is None:
            log.warning("no SGMV kernel for %s activations with a %s adapter pool on %s: using the per-segment "
                        "torch path", self.model.dtype, pool.buffer.dtype, self.device)
        self.lora_batch = functools.partial(KernelLoraBatch.build, ops=ops) if ops else LoraBatch.build

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor]:
        """Run one step. -> (sequences that sample a token now, their logits [N, vocab] fp32)."""
        step = self._prepare(batch)
        for slots, kv in step.kv_writes:  # prefix-tuning virtual tokens: their K/V is the adapter itself
            self.write_kv(slots, kv)
        if step.input_ids.numel() == 0:  # nothing but such writes this step
            return [], torch.empty(0, self.model.config.vocab_size, dtype=torch.float32, device=self.device)
        embeds = None
        if step.virtual_embeds:  # prompt-tuning virtual tokens: the adapter's embeddings replace the lookup
            embeds = self.model.embed_tokens(step.input_ids)
            for row, e in step.virtual_embeds:
                embeds[row:row + e.shape[0]] = e.to(self.device, embeds.dtype)
        lora = self._adapter_batch(step.spans, step.input_ids.numel())
        hidden = self.model(step.input_ids, step.positions, step.attn, adapters=lora, inputs_embeds=embeds)
        if not step.samplers:
            return [], hidden.new_empty(0, self.model.config.vocab_size, dtype=torch.float32)
        return step.samplers, self.model.logits(hidden[step.sample_rows])

    def _adapter_batch(self, spans: list[tuple[Sequence, int, int]], num_tokens: int):
        """The step's adapter appliers for the linear seam, one per kind present (each kind builds its own)."""
        by_kind: dict = {}
        for seq, start, n in spans:
            if seq.adapter is not None:
                by_kind.setdefault(seq.adapter.kind, []).append((seq.adapter.entry, start, n))
        appliers = [a for kind, ks in by_kind.items() if (a := kind.applier(self, ks, num_tokens)) is not None]
        return None if not appliers else appliers[0] if len(appliers) == 1 else StepAdapters(appliers)

    # -- prefix-tuning adapters' virtual tokens --------------------------------------------------
    @torch.inference_mode()
    def write_kv(self, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """kv [2 * layers, n, KVH, D] (row 2i keys, 2i + 1 values of layer i) into cache slots [n]."""
        cache = self.kv_cache.view(-1, *self.kv_cache.shape[2:])  # [layers * 2, slots, KVH, D]
        cache[:, slots.to(self.device)] = kv.to(self.device, self.kv_cache.dtype)

    def _prepare(self, batch: ScheduledBatch) -> "_StepInputs":
        """The step's model inputs. Each sequence runs cache positions num_computed .. num_computed + n - 1;
        position p < prefix_len is virtual token p of its adapter (written or embedded, never looked up)."""
        bs = self.block_size
        step = _StepInputs()
        ids: list[int] = []
        pos: list[int] = []
        slot_parts: list[torch.Tensor] = []
        sample_rows: list[int] = []
        prefills: list[PrefillChunk] = []
        nd = batch.num_decodes
        dec_tables: list[list[int]] = []
        dec_lens: list[int] = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
            c, end = seq.num_computed, seq.num_computed + n
            table = torch.tensor(seq.block_table, dtype=torch.int64)
            ctx_slots = (table[:, None] * bs + self._block_offsets).flatten()[:end]  # [ctx]
            first = c  # first position that runs through the model
            if c < seq.prefix_len:
                v_end = min(end, seq.prefix_len)
                prompt = seq.adapter.host  # a PromptAdapter
                if prompt.kind == "prefix":
                    step.kv_writes.append((ctx_slots[c:v_end], prompt.prefix_kv(self.model.config)[:, c:v_end]))
                    first = v_end
                else:
                    step.virtual_embeds.append((len(ids), prompt.embeddings(seq.task_id)[c:v_end]))
            m = end - first
            if m == 0:
                continue
            start = len(ids)
            v = seq.prefix_len
            ids.extend([0] * max(0, min(end, v) - first) + seq.token_ids[max(first, v) - v:end - v])
            pos.extend(range(first, end))
            slot_parts.append(ctx_slots[first:])
            step.spans.append((seq, start, m))
            if i < nd:
                dec_tables.append(seq.block_table)
                dec_lens.append(end)
            else:
                prefills.append(PrefillChunk(start, m, end, ctx_slots.to(self.device)))
            if end == seq.num_tokens:
                sample_rows.append(start + m - 1)
                step.samplers.append(seq)
        dec_bt = dec_len = None
        if dec_tables:
            width = max(len(t) for t in dec_tables)
            dec_bt = torch.tensor([t + [0] * (width - len(t)) for t in dec_tables], dtype=torch.int64).to(self.device)
            dec_len = torch.tensor(dec_lens, dtype=torch.int32).to(self.device)
        slots = torch.cat(slot_parts) if slot_parts else torch.empty(0, dtype=torch.int64)
        step.attn = AttentionMetadata(slot_mapping=slots.to(self.device), num_decodes=len(dec_tables),
                                      decode_block_tables=dec_bt, decode_lens=dec_len, prefills=prefills)
        step.input_ids = torch.tensor(ids, dtype=torch.int64, device=self.device)
        step.positions = torch.tensor(pos, dtype=torch.int64, device=self.device)
        step.sample_rows = torch.tensor(sample_rows, dtype=torch.int64, device=self.device)
        return step


@dataclass
class _StepInputs:
    input_ids: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    attn: AttentionMetadata | None = None
    sample_rows: torch.Tensor | None = None
    samplers: list[Sequence] = field(default_factory=list)  # sequences that sample a token after this step
    spans: list[tuple[Sequence, int, int]] = field(default_factory=list)  # (seq, first row, rows) in the forward
    kv_writes: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (slots, [2L, n, KVH, D])
    virtual_embeds: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (first row, [n, hidden])
