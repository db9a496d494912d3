"""Continuous batching: which sequences run this step, and how many tokens each.

Every step has a token budget. Running sequences that decode (one token) go first, then running
sequences still prefilling (in chunks), then waiting ones in arrival order. A waiting sequence starts
on the cached blocks of its longest already-computed prefix (block_manager.py) and computes the rest.
When KV blocks run out, idle cached blocks are evicted first (the allocator does it on demand), then
the youngest running sequence is preempted: its blocks are freed and it is recomputed later.

Progress: admission (LLMEngine.make_sequence) refuses a request that needs more blocks than the cache
has, so the oldest running sequence can always grow (everything else can be reclaimed or preempted),
and a request waiting alone is admitted without the growth watermark.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Hashable, Protocol

from server.engine.block_manager import BlockManager
from server.engine.sequence import Sequence, SequenceStatus


class AdapterGate(Protocol):
    """The one question the scheduler asks the adapter side (server/adapters/admission.py)."""

    def group(self, seq: Sequence) -> Hashable | None: ...  # what its adapter competes for; None: no adapter
    def admit(self, seq: Sequence, running: list[Sequence]) -> bool: ...  # ready and pinned now, or not now
    def resident(self, seq: Sequence) -> bool: ...  # its adapter can run without taking anything new (pages)
    def release(self, seq: Sequence) -> None: ...  # it stopped running


MAX_PASS_OVER = 16  # steps a request blocked on its adapter may be passed by later ones with resident adapters


class _NoAdapters:
    def group(self, seq):
        return None

    def admit(self, seq, running):
        return True

    def resident(self, seq):
        return True

    def release(self, seq):
        pass


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)  # single-token steps first, then prefill chunks
    num_tokens: list[int] = field(default_factory=list)  # tokens each sequence runs this step
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[tuple[Sequence, str]] = field(default_factory=list)  # taken off the queue: why they cannot run

    @property
    def num_decodes(self) -> int:
        n = 0
        while n < len(self.num_tokens) and self.num_tokens[n] == 1:
            n += 1
        return n

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 adapters: AdapterGate | None = None):
        self.blocks = block_manager
        self.adapters = adapters or _NoAdapters()
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self.num_preemptions = 0
        # Keep a few blocks back when admitting new work so running sequences can grow.
        self._watermark = max(1, block_manager.allocator.num_blocks // 100)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free all its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
            self.adapters.release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        picked: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []

        # Running sequences: decodes before prefill chunks, oldest first within each.
        ordered = sorted(self.running, key=lambda s: s.num_uncomputed != 1)
        for seq in ordered:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_uncomputed, budget)
            if n == 0:
                break
            if not self._reserve(seq, n, preempted):
                continue  # seq itself was preempted
            budget -= n
            picked.append((seq, n))

        # Waiting sequences in arrival order (preempted ones were put back in front). One whose adapter
        # cannot run now (--max-loras reached, pool full of pinned adapters, its pages still being copied in)
        # lets later ones of its group go first only if they take nothing it waits for: their adapter already
        # runs, or it is resident (no new pages), and the older one has been passed over fewer than
        # MAX_PASS_OVER steps (after that its group waits for it: every request makes progress).
        blocked: list[Sequence] = []
        oldest_blocked: dict[Hashable, Sequence] = {}  # group -> its oldest blocked sequence this step
        passed: set[Sequence] = set()
        failed: list[tuple[Sequence, str]] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            group = self.adapters.group(seq)
            passing = oldest_blocked.get(group) if group is not None else None
            if passing is not None and seq.adapter_id in {s.adapter_id for s in self.running}:
                passing = None  # its adapter already runs: it takes nothing the older one waits for
            if passing is not None and (passing.passed_over >= MAX_PASS_OVER or not self.adapters.resident(seq)):
                # it would take an adapter slot or pages the older one waits for first
                blocked.append(self.waiting.popleft())
                continue
            try:
                ready = self.adapters.admit(seq, self.running)
            except Exception as exc:  # this request's adapter only: it fails, the queue goes on
                self.waiting.popleft()
                failed.append((seq, f"its adapter could not be made ready: {type(exc).__name__}: {exc}"))
                continue
            if not ready:
                blocked.append(self.waiting.popleft())
                if group is not None:
                    oldest_blocked.setdefault(group, seq)
                continue
            hits = self.blocks.find_cached(seq)  # leading blocks another request already computed
            n = min(seq.num_uncomputed - len(hits) * self.blocks.block_size, budget)
            # the watermark keeps room for running sequences to grow; with none running it only starves
            if not self.blocks.can_allocate(self.blocks.start_cost(hits, n) + (self._watermark if self.running else 0)):
                self.adapters.release(seq)
                break
            self.waiting.popleft()
            self.blocks.reuse(seq, hits)
            self.blocks.grow(seq, n)
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            budget -= n
            picked.append((seq, n))
            if passing is not None:
                passed.add(passing)  # it went ahead of the older blocked one

        self.waiting.extendleft(reversed(blocked))
        for seq in passed:
            if seq.status is SequenceStatus.WAITING:
                seq.passed_over += 1
        batch = ScheduledBatch(preempted=preempted, failed=failed)
        # A sequence preempted after it was picked (to make room for an older one) sits out.
        picked = [(s, n) for s, n in picked if s.status is SequenceStatus.RUNNING]
        # decodes first (attention splits there); within each part, one adapter's tokens stay together
        for seq, n in sorted(picked, key=lambda p: (p[1] != 1, p[0].adapter_id or "")):
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
        return batch

    def _reserve(self, seq: Sequence, n: int, preempted: list[Sequence]) -> bool:
        """Grow seq's table for n tokens, preempting the youngest running sequences if needed."""
        need = self.blocks.blocks_needed(seq, n)
        while not self.blocks.can_allocate(need):  # idle cached blocks count: they are evicted on demand
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        self.blocks.grow(seq, n)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.adapters.release(seq)
        self.blocks.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
