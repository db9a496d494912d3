"""KV-cache blocks, their one owner: a reference-counted allocator with automatic prefix caching.

A block holds `block_size` consecutive cache positions of one context. Blocks are reference-counted
so one block can sit in many sequences' tables; a block returns to the allocator when its last user
lets go.

Prefix caching (vLLM's design): once a block is full and computed, it is registered under a hash of
(the hash of the block before it, the tokens in it); the first block's parent is the sequence's
`cache_salt`, which names the adapter instance that shaped its keys/values (empty for the base model).
A freed registered block is not wiped: it waits in an LRU list and a later sequence whose leading
blocks hash the same takes it back instead of computing it again. Allocation takes never-cached blocks
first, then evicts the least recently freed cached block. A block in use is never evicted. Virtual
tokens of prefix/prompt-tuning adapters are positions like any other (see Sequence.cache_tokens), so
an adapter's virtual-token blocks are shared by all its requests through this same cache.

With one memory budget (server/engine/memory.py) idle blocks may be lent to the adapter pool (`lend`)
and come back when the cache needs them (`take_back`); a lent block is nobody's here.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from typing import Callable

from server.engine.sequence import Sequence


class NoFreeBlocksError(RuntimeError):
    pass


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """A collision-resistant key (one tenant must never be able to aim at another's blocks)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockAllocator:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free = deque(range(num_blocks))  # blocks holding nothing reusable
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody uses, least recent first
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.block_salt: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block
        self.virtual: set[int] = set()  # cached blocks that hold adapters' virtual tokens
        self.num_evictions = 0
        self.lent: set[int] = set()  # blocks lent to the adapter pool (one memory budget)

    @property
    def capacity(self) -> int:
        """Blocks the cache holds now (all of them unless some are lent to the adapter pool)."""
        return self.num_blocks - len(self.lent)

    @property
    def num_free(self) -> int:
        """Blocks a new sequence can get (idle cached blocks included: they are evicted on demand)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    @property
    def num_uncached_free(self) -> int:
        return len(self._free)

    def lend(self, k: int, cached: bool = True) -> list[int]:
        """Up to k idle blocks for the adapter pool: never-cached ones first (highest ids first, so lent blocks
        tend to be neighbours), then (cached) the least recently used cached ones."""
        out = sorted(self._free, reverse=True)[:k]
        if out:
            taken = set(out)
            self._free = deque(b for b in self._free if b not in taken)
        while cached and len(out) < k and self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._uncache(block)
            self.num_evictions += 1
            out.append(block)
        self.lent.update(out)
        return out

    def take_back(self, blocks: list[int]) -> None:
        for b in blocks:
            self.lent.remove(b)
            self._free.append(b)

    @property
    def num_cached(self) -> int:
        return len(self.cached)

    def allocate(self) -> int:
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            self._uncache(block)
            self.num_evictions += 1
        else:
            raise NoFreeBlocksError("no free KV blocks")
        self.ref_counts[block] = 1
        return block

    def incref(self, block: int) -> None:
        if self.ref_counts[block] <= 0:
            if block not in self._evictable:
                raise ValueError(f"block {block} is free; it cannot be shared")
            del self._evictable[block]  # a cache hit takes it back
        self.ref_counts[block] += 1

    def decref(self, block: int) -> None:
        if self.ref_counts[block] <= 0:
            raise ValueError(f"block {block} freed twice")
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            if self.block_hash[block] is not None:
                self._evictable[block] = None  # most recently freed: evicted last
            else:
                self._free.append(block)

    # -- the prefix cache ------------------------------------------------------------------------
    def lookup(self, h: bytes) -> int | None:
        return self.cached.get(h)

    def register(self, block: int, h: bytes, salt: bytes, virtual: bool) -> None:
        """Make a full, computed block findable by its hash (a hash already cached keeps its first block)."""
        if h in self.cached or self.block_hash[block] is not None:
            return
        self.cached[h] = block
        self.block_hash[block] = h
        self.block_salt[block] = salt
        if virtual:
            self.virtual.add(block)

    def forget_salt(self, prefix: bytes) -> int:
        """An adapter instance is gone: blocks cached under salts starting with prefix can never be hit
        again; idle ones become free at once."""
        gone = [b for b, s in enumerate(self.block_salt) if s is not None and s.startswith(prefix)]
        for b in gone:
            self._uncache(b)
            if b in self._evictable:
                del self._evictable[b]
                self._free.append(b)
        return len(gone)

    def reset_cache(self) -> None:
        """Forget every cached block (idle ones become free; blocks in use stay with their sequences)."""
        for b in [b for b in range(self.num_blocks) if self.block_hash[b] is not None]:
            self._uncache(b)
        self._free.extend(self._evictable)
        self._evictable.clear()

    def _uncache(self, block: int) -> None:
        del self.cached[self.block_hash[block]]
        self.block_hash[block] = self.block_salt[block] = None
        self.virtual.discard(block)


class BlockManager:
    """Grows, shares and frees sequences' block tables on top of one allocator."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_queries = 0  # cache positions looked up at admission (vllm:prefix_cache_queries)
        self.prefix_hits = 0  # of them found cached (vllm:prefix_cache_hits)
        # one memory budget: blocks short -> take that many back from the adapter pool (server/engine/memory.py)
        self.reclaim: Callable[[int], int] | None = None

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_cached_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        """Room for num_blocks more; short of it, blocks lent to the adapter pool are taken back first."""
        short = num_blocks - self.allocator.num_free
        if short > 0 and self.reclaim is not None:
            self.reclaim(short)
        return num_blocks <= self.allocator.num_free

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give seq enough blocks to hold num_new_tokens more tokens."""
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            seq.block_table.append(self.allocator.allocate())

    def share(self, seq: Sequence, blocks: list[int]) -> None:
        """Start seq's table with already-filled shared blocks (a prefix others use too)."""
        for b in blocks:
            self.allocator.incref(b)
        seq.block_table.extend(blocks)

    def free(self, seq: Sequence) -> None:
        # the tail first: of one sequence's cached blocks, its last ones are evicted first
        for b in reversed(seq.block_table):
            self.allocator.decref(b)
        seq.block_table = []
        seq.num_cached_blocks = 0

    # -- the prefix cache ------------------------------------------------------------------------
    def find_cached(self, seq: Sequence) -> list[int]:
        """The cached blocks that hold seq's leading positions (a sequence with no blocks yet). At least
        one position is always left to compute: the step that computes it gives the next token's logits."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            b = self.allocator.lookup(self._hash(seq, i))
            if b is None:
                break
            hits.append(b)
        return hits

    def reuse(self, seq: Sequence, hits: list[int]) -> None:
        """Start seq (no blocks yet) on the cached blocks find_cached gave: their positions count as computed."""
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        self.share(seq, hits)
        seq.num_computed = len(hits) * self.block_size
        seq.num_cached_blocks = len(hits)

    def start_cost(self, hits: list[int], num_new_tokens: int) -> int:
        """Free blocks a sequence with no blocks yet takes to start on `hits` (find_cached) and run
        num_new_tokens more positions: its new blocks, plus the idle cached hits that sharing takes back."""
        total = len(hits) * self.block_size + num_new_tokens
        revived = sum(1 for b in hits if self.allocator.ref_counts[b] == 0)
        return -(-total // self.block_size) - len(hits) + revived

    def cache_computed(self, seq: Sequence) -> None:
        """After a step: register seq's blocks that are now full and computed."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed // self.block_size, len(seq.block_table))
        for i in range(seq.num_cached_blocks, full):
            self.allocator.register(seq.block_table[i], self._hash(seq, i), seq.cache_salt,
                                    virtual=i * self.block_size < seq.prefix_len)
        seq.num_cached_blocks = max(seq.num_cached_blocks, full)

    def _hash(self, seq: Sequence, i: int) -> bytes:
        """Block i's hash (computed once per sequence: its positions never change)."""
        bs = self.block_size
        while len(seq.block_hashes) <= i:
            j = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else b"tessera-kv\0" + seq.cache_salt
            seq.block_hashes.append(block_hash(parent, seq.cache_tokens(j * bs, (j + 1) * bs)))
        return seq.block_hashes[i]

    @property
    def usage(self) -> float:
        return self.allocator.num_used / max(1, self.allocator.capacity)
