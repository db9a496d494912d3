"""KV-cache blocks: a reference-counted allocator and the per-sequence block tables.

A block holds `block_size` consecutive tokens of one context. Blocks are reference-counted so one
block can sit in many sequences' tables (shared prefixes: prefix-tuning adapters, prefix caching);
a block returns to the free list when its last user lets go.
"""
from __future__ import annotations

from collections import deque

from server.engine.sequence import Sequence


class NoFreeBlocksError(RuntimeError):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise NoFreeBlocksError("no free KV blocks")
        block = self._free.popleft()
        self.ref_counts[block] = 1
        return block

    def incref(self, block: int) -> None:
        if self.ref_counts[block] <= 0:
            raise ValueError(f"block {block} is free; it cannot be shared")
        self.ref_counts[block] += 1

    def decref(self, block: int) -> None:
        if self.ref_counts[block] <= 0:
            raise ValueError(f"block {block} freed twice")
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self._free.append(block)


class BlockManager:
    """Grows and frees sequences' block tables on top of one allocator."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_cached_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
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
        for b in seq.block_table:
            self.allocator.decref(b)
        seq.block_table = []

    @property
    def usage(self) -> float:
        return self.allocator.num_used / max(1, self.allocator.num_blocks)
