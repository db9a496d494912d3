"""One memory budget for KV blocks and adapter pages (S-LoRA's unified paging), with --memory-budget.

The KV cache tensor is then the only device buffer for both. It is [layers, K/V, slots, KVH, D], so KV
block b is 2 * layers strips of block_size * KVH * D elements, strip j starting at element
(j * num_blocks + b) * strip. The adapter pool views the same tensor as pages whose size divides a
strip (server/adapters/pool.py, shared), so every page lies in exactly one block. Pool page ids are
block-major (block b owns ids b * pages_per_block ..), mapped to buffer rows by `physical`: the pool's
contiguous runs are runs of whole blocks, so an adapter spans few blocks and blocks free up whole.
Lending block b to the pool grants it that block's ids, taking the block back revokes them. Kernels see
no difference: KV blocks are addressed through block tables and adapter pages through page tables.

The split follows the load, on the engine thread:
- idle memory waits in the pool: after each schedule the never-used free blocks beyond a reserve and
  what the running and next waiting sequences may still take are lent (`lend_idle`), so adapters loaded in worker threads find free
  pages and stay resident as long as nothing else needs the memory; the prefix cache's blocks stay.
- adapter pages short (a queued request's adapter is made resident or prefetched): the cache lends idle
  blocks, cached ones too, keeping the reserve and what its sequences may still take, up to the
  --adapter-memory bound; adapters are evicted only when that is not enough (manager._pool_room).
- KV blocks short (a sequence grows, a request is admitted): lent blocks come back, free ones first, then
  ones whose adapters no running sequence pins and no copy is filling (those adapters go back to their
  host copy), ones no queued request waits for first; up to the --kv-cache-memory bound. Only then does
  the scheduler preempt.
The pool side runs under the adapter manager's lock, since the prefetch thread allocates from it.
"""
from __future__ import annotations

import logging
from collections import defaultdict

import torch

from server.engine.block_manager import BlockAllocator

log = logging.getLogger("tessera.engine")


class UnifiedMemory:
    def __init__(self, allocator: BlockAllocator, manager, num_layers: int, strip: int, kv_max_blocks: int,
                 reserve: int):
        self.allocator, self.manager = allocator, manager
        self.pool = manager.pool
        nb = allocator.num_blocks
        pps = strip // self.pool.page_size  # pages per strip
        self._pps, self._nb = pps, nb
        self.pages_per_block = 2 * num_layers * pps
        self.pool.map_pages(self.physical)
        self.kv_max_blocks = min(nb, kv_max_blocks)
        self.max_lent = min(nb, max(1, self.pool.max_pages // self.pages_per_block))  # the --adapter-memory bound
        self.pool.max_pages = self.max_lent * self.pages_per_block  # what an adapter may take at most
        self.reserve = reserve
        self._demand = 0  # blocks the running and next waiting sequences may still take (engine, each step)
        self.num_lent = 0  # blocks lent to the pool, counted over time
        self.num_reclaimed = 0  # blocks taken back
        self._blocks: dict = {}  # adapter entry -> (its pages tensor, the blocks they lie in)
        manager.lend = self.lend
        extra = nb - self.kv_max_blocks
        if extra > 0:  # a KV bound below the budget: the rest is the pool's from the start
            with manager.lock:
                self._grant(allocator.lend(extra))
        self.lend_idle()

    def block_pages(self, block: int) -> torch.Tensor:
        """The pool page ids of one KV block, ascending."""
        return torch.arange(block * self.pages_per_block, (block + 1) * self.pages_per_block)

    def block_of(self, pages: torch.Tensor) -> torch.Tensor:
        return pages // self.pages_per_block

    def physical(self, pages: torch.Tensor) -> torch.Tensor:
        """Page ids -> rows of the KV cache viewed as [*, page_size]: page i of block b is page i % pps of
        block b's strip i // pps."""
        block, i = pages // self.pages_per_block, pages % self.pages_per_block
        return ((i // self._pps) * self._nb + block) * self._pps + i % self._pps

    # -- adapter pages short: lend idle KV blocks (the manager's lock is held) ------------------------------
    def lend(self, pages_short: int) -> int:
        """Up to pages_short more pool pages from idle KV blocks -> pages granted."""
        k = -(-pages_short // self.pages_per_block)
        k = min(k, self.max_lent - len(self.allocator.lent), self.allocator.num_free - max(self.reserve, self._demand))
        if k <= 0:
            return 0
        blocks = self.allocator.lend(k)
        self._grant(blocks)
        log.debug("lent %d KV blocks to the adapter pool (%d lent, %d pool pages)", len(blocks),
                  len(self.allocator.lent), self.pool.capacity)
        return len(blocks) * self.pages_per_block

    def lend_idle(self, demand: int = 0) -> None:
        """The engine thread, after scheduling: never-used free blocks beyond the reserve and `demand` (blocks the
        running and first waiting sequences may still take) go to the pool."""
        self._demand = demand  # what on-demand lending (lend) leaves to the cache too
        k = min(self.allocator.num_uncached_free - max(self.reserve, demand),
                self.max_lent - len(self.allocator.lent))
        if k > 0:
            with self.manager.lock:
                self._grant(self.allocator.lend(k, cached=False))

    def _grant(self, blocks: list[int]) -> None:
        for b in blocks:
            self.pool.grant(self.block_pages(b))
        self.num_lent += len(blocks)

    # -- KV blocks short: take lent blocks back ----------------------------------------------------------
    def reclaim(self, blocks_short: int) -> int:
        """Up to blocks_short lent blocks back to the cache (evicting unpinned adapters) -> blocks returned."""
        want = min(blocks_short, self.kv_max_blocks - self.allocator.capacity)
        got: list[int] = []
        with self.manager.lock:
            for b in self._free_blocks(want):  # whole free blocks first: nothing to evict, nothing to scan
                if self.pool.revoke(self.block_pages(b)):
                    got.append(b)
            tried: set[int] = set(got)
            while len(got) < want:
                b, users = self._cheapest(tried)
                if b is None:
                    break
                tried.add(b)
                for e in users:
                    self.manager.evict(e)
                if self.pool.revoke(self.block_pages(b)):
                    got.append(b)
            self.allocator.take_back(got)
        if got:
            self.num_reclaimed += len(got)
            log.debug("took %d KV blocks back from the adapter pool (%d still lent)", len(got),
                      len(self.allocator.lent))
        return len(got)

    def _free_blocks(self, k: int) -> list[int]:
        """Up to k lent blocks all of whose pages are free (read off the pool's free runs: ids are block-major)."""
        ppb, out = self.pages_per_block, []
        for start, length in self.pool.free_runs():
            for b in range(-(-start // ppb), (start + length) // ppb):
                out.append(b)
                if len(out) == k:
                    return out
        return out

    def _cheapest(self, tried: set[int]):
        """The lent block cheapest to take back, and the device-resident adapters with pages in it: None if
        every lent block holds a pinned adapter or one being copied in."""
        users: dict[int, list] = defaultdict(list)
        known: dict = {}
        for e in self.manager.entries.values():
            if e.pages is not None:
                pages, blocks = self._blocks.get(e, (None, None))
                if pages is not e.pages:  # an adapter's blocks, computed once per placement
                    blocks = torch.unique(self.block_of(e.pages)).tolist()
                known[e] = (e.pages, blocks)
                for b in blocks:
                    users[b].append(e)
        self._blocks = known
        best, best_key = None, None
        for b in self.allocator.lent - tried:
            us = users.get(b, [])
            if any(e.pins or e.staging or e.device is None for e in us):
                continue
            key = (any(e.refs for e in us), len(us), max((e.last_used for e in us), default=0.0))
            if best_key is None or key < best_key:
                best, best_key = b, key
        return best, users.get(best, []) if best is not None else []
