"""The adapter side of scheduling: can this sequence's adapter run in this step, and at what cost.

The scheduler asks through this one object (engine/scheduler.py's `AdapterGate`); it never reaches into
the registry or the model runner. Costs here: a --max-loras slot for a new LoRA adapter in the batch, and
device pool pages (making the adapter resident may evict unpinned ones). Prompt-learning adapters cost
KV positions, which the scheduler counts like any other (their virtual tokens are the sequence's first
positions). A sequence's adapter is pinned from admission until it stops running.
"""
from __future__ import annotations

from server.adapters.manager import AdapterManager
from server.engine.sequence import Sequence


class AdapterAdmission:
    def __init__(self, manager: AdapterManager, max_loras: int):
        self.manager = manager
        self.max_loras = max_loras

    def group(self, seq: Sequence):
        """Which resource seq's adapter competes for (sequences of one group wait in arrival order), or None."""
        return None if seq.adapter is None else seq.adapter.kind

    def admit(self, seq: Sequence, running: list[Sequence]) -> bool:
        """Make seq's adapter ready to run now and pin it; False: not in this step (it stays queued)."""
        h = seq.adapter
        if h is None:
            return True
        if h.kind.counts_against_max_loras:
            active = {s.adapter.entry for s in running if s.adapter is not None and s.adapter.kind.counts_against_max_loras}
            if h.entry not in active and len(active) >= self.max_loras:
                return False
        if not self.manager.make_resident(h):
            return False
        self.manager.pin(h)
        return True

    def resident(self, seq: Sequence) -> bool:
        """seq's adapter runs without taking anything new: no adapter, a kind without pages, or already in
        device pages (its pin takes none). The scheduler lets such a request pass an older blocked one."""
        h = seq.adapter
        return h is None or not h.kind.uses_pool or h.entry.device is not None

    def release(self, seq: Sequence) -> None:
        """seq stopped running (finished, failed, preempted): its adapter may be evicted again."""
        if seq.adapter is not None:
            self.manager.unpin(seq.adapter)

