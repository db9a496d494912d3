"""Prompt-learning adapters as KV-cache blocks that every request using them shares.

A prefix adapter's stored keys/values, or the keys/values a prefill computes from a prompt-tuning
adapter's virtual-token embeddings, are written once into KV blocks the store owns (one reference).
A request using the adapter starts its block table with those blocks (one more reference each) and
its own tokens continue at cache position nvt (positions nvt, nvt + 1, ... as in PEFT's generate).
When nvt is not a multiple of the block size, the last, partly filled block gets a private copy per
request (copy-on-write before the request's first token lands in it).

Materialized prefixes count against a block budget; unused ones are freed least-recently-used first
(and made again from the adapter in host memory when needed); those whose adapter was unloaded are
freed once no request uses them. An adapter whose prefix needs more blocks than the whole budget is
refused when it is loaded (`refusal`, checked by the AdapterManager), so a prefix that is attached
fits once the prefixes other requests are using are let go.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from loader.prompt_adapter import PromptAdapter
from server.engine.block_manager import BlockManager
from server.engine.sequence import Sequence

log = logging.getLogger("tessera.adapters")


@dataclass
class _Prefix:
    source: PromptAdapter  # the loaded adapter it was made from (an id reloaded from elsewhere differs)
    blocks: list[int]
    length: int  # virtual tokens
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)


class KVPrefixStore:
    def __init__(self, blocks: BlockManager, runner, model_config, budget_blocks: int):
        self.blocks, self.runner, self.cfg = blocks, runner, model_config
        self.budget = budget_blocks
        self.prefixes: dict[tuple[str, int], _Prefix] = {}  # (adapter id, task) -> its blocks
        self.num_blocks = 0  # blocks held by materialized prefixes (read by the metrics thread)

    def blocks_for(self, num_virtual_tokens: int) -> int:
        return -(-num_virtual_tokens // self.blocks.block_size)

    def refusal(self, num_virtual_tokens: int) -> str | None:
        """Why a prefix of this many virtual tokens can never be held (None: it fits the budget)."""
        need = self.blocks_for(num_virtual_tokens)
        if need <= self.budget:
            return None
        return (f"needs {need} KV blocks for its {num_virtual_tokens} virtual tokens but --adapter-kv-fraction "
                f"allows {self.budget} of the {self.blocks.allocator.num_blocks}-block cache: raise "
                "--adapter-kv-fraction or --kv-cache-memory")

    def attach(self, seq: Sequence, adapter: PromptAdapter, task: int) -> bool:
        """Start seq's block table with the adapter's prefix (materializing it). False: no room now."""
        key = (seq.adapter_id, task)
        p = self.prefixes.get(key)
        if p is not None and p.source is not adapter:  # the id was unloaded and loaded again
            if p.users:
                return False  # the old prefix's requests finish first
            self._free(key)
            p = None
        p = p or self._materialize(key, adapter, task)
        if p is None:
            return False
        bs = self.blocks.block_size
        full, part = divmod(p.length, bs)
        if part and not self.blocks.can_allocate(1):
            return False
        self.blocks.share(seq, p.blocks[:full])
        if part:
            own = self.blocks.allocator.allocate()
            seq.block_table.append(own)
            offsets = torch.arange(part)
            self.runner.copy_kv(p.blocks[full] * bs + offsets, own * bs + offsets)
        p.users += 1
        p.last_used = time.monotonic()
        seq.kv_prefix = key
        return True

    def detach(self, seq: Sequence) -> None:
        """seq no longer runs: its blocks (shared ones: one reference) go back."""
        if seq.kv_prefix is None:
            return
        p = self.prefixes.get(seq.kv_prefix)
        if p is not None:
            p.users -= 1
            p.last_used = time.monotonic()
        self.blocks.free(seq)
        seq.kv_prefix = None

    def collect(self, current) -> None:
        """Free unused prefixes whose adapter is gone: current(adapter_id) is not their source."""
        for key in [k for k, p in self.prefixes.items() if p.users == 0 and current(k[0]) is not p.source]:
            self._free(key)

    def reclaim(self, need: int) -> None:
        """The cache is short: free idle prefixes (least recently used first) until `need` blocks are free.
        They are made again from the adapter in host memory when a request needs them."""
        while not self.blocks.can_allocate(need):
            idle = [k for k, p in self.prefixes.items() if p.users == 0]
            if not idle:
                return
            self._free(min(idle, key=lambda k: self.prefixes[k].last_used))

    def _materialize(self, key: tuple[str, int], adapter: PromptAdapter, task: int) -> _Prefix | None:
        bs = self.blocks.block_size
        n = adapter.num_virtual_tokens
        need = self.blocks_for(n)
        if need > self.budget:  # refused at load (refusal); never free other prefixes for it
            return None
        while self.num_blocks + need > self.budget or not self.blocks.can_allocate(need):
            idle = [k for k, p in self.prefixes.items() if p.users == 0]
            if not idle:
                return None
            self._free(min(idle, key=lambda k: self.prefixes[k].last_used))
        t0 = time.perf_counter()
        blocks = [self.blocks.allocator.allocate() for _ in range(need)]
        slots = (torch.tensor(blocks)[:, None] * bs + torch.arange(bs)).flatten()[:n]
        if adapter.kind == "prefix":
            self.runner.write_kv(slots, adapter.prefix_kv(self.cfg))
        else:
            self.runner.prefill_embeddings(adapter.embeddings(task), slots)
        p = _Prefix(adapter, blocks, n)
        self.prefixes[key] = p
        self.num_blocks += need
        log.info("adapter %s%s: %d virtual tokens in %d shared KV blocks (%.1f ms)", key[0],
                 f" task {task}" if adapter.num_tasks > 1 else "", n, need, (time.perf_counter() - t0) * 1000)
        return p

    def _free(self, key: tuple[str, int]) -> None:
        p = self.prefixes.pop(key)
        self.num_blocks -= len(p.blocks)
        for b in p.blocks:
            self.blocks.allocator.decref(b)
        log.debug("adapter %s: shared KV prefix freed", key[0])
