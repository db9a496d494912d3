"""KV block allocator and scheduler bookkeeping: sharing, freeing, preemption order."""
from __future__ import annotations

import pytest

from server.engine.block_manager import BlockManager, NoFreeBlocksError
from server.engine.request import SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence, SequenceStatus


def _seq(name: str, n: int) -> Sequence:
    return Sequence(name, list(range(1, n + 1)), SamplingParams(max_new_tokens=8))


def test_shared_blocks_are_freed_by_the_last_user():
    bm = BlockManager(num_blocks=8, block_size=4)
    owner = _seq("prefix", 8)
    bm.grow(owner, 8)
    assert owner.block_table == [0, 1] and bm.allocator.num_used == 2
    a, b = _seq("a", 3), _seq("b", 5)
    for s in (a, b):
        bm.share(s, owner.block_table)
        s.num_computed = 8  # the shared blocks hold its first 8 positions, computed
        bm.grow(s, len(s.token_ids))
    assert a.block_table[:2] == b.block_table[:2] == [0, 1]
    assert len(a.block_table) == 3 and len(b.block_table) == 4
    assert bm.allocator.ref_counts[0] == 3
    bm.free(owner)
    bm.free(a)
    assert bm.allocator.ref_counts[0] == 1 and bm.allocator.num_used == 4
    bm.free(b)
    assert bm.allocator.num_used == 0 and bm.allocator.num_free == 8
    with pytest.raises(ValueError, match="freed twice"):
        bm.allocator.decref(0)


def test_allocator_exhaustion_raises():
    bm = BlockManager(num_blocks=1, block_size=4)
    bm.allocator.allocate()
    with pytest.raises(NoFreeBlocksError):
        bm.allocator.allocate()


def test_budget_decodes_first_and_chunked_prefill():
    bm = BlockManager(num_blocks=100, block_size=4)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10)
    long, short = _seq("long", 25), _seq("short", 3)
    sch.add(long)
    sch.add(short)
    b = sch.schedule()
    assert [s.request_id for s in b.seqs] == ["long"] and b.num_tokens == [10]
    long.num_computed += 10
    b = sch.schedule()  # long continues its prefill, short is admitted with what is left of the budget
    assert [(s.request_id, n) for s, n in zip(b.seqs, b.num_tokens)] == [("long", 10)]
    long.num_computed += 10
    b = sch.schedule()
    assert [(s.request_id, n) for s, n in zip(b.seqs, b.num_tokens)] == [("long", 5), ("short", 3)]
    long.num_computed += 5
    short.num_computed += 3
    long.token_ids.append(7)
    short.token_ids.append(7)
    b = sch.schedule()
    assert b.num_tokens == [1, 1] and b.num_decodes == 2


def test_preemption_takes_the_youngest_and_requeues_it_first():
    bm = BlockManager(num_blocks=4, block_size=4)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    sch._watermark = 0
    old, young = _seq("old", 8), _seq("young", 8)
    sch.add(old)
    sch.add(young)
    b = sch.schedule()
    assert [s.request_id for s in b.seqs] == ["old", "young"] and bm.allocator.num_free == 0
    for s in (old, young):
        s.num_computed = 8
        s.token_ids.append(9)
    b = sch.schedule()  # old needs a 3rd block: young is preempted
    assert [s.request_id for s in b.seqs] == ["old"] and b.preempted == [young]
    assert young.status is SequenceStatus.WAITING and young.num_computed == 0 and young.block_table == []
    assert sch.waiting[0] is young and sch.num_preemptions == 1
    sch.remove(old)
    assert bm.allocator.num_used == 0


def test_a_request_blocked_on_its_adapter_is_not_overtaken_by_new_adapters():
    """A 4-page adapter pool: A runs adapter a (2 pages); B's adapter b needs all 4, so B waits. C (adapter c,
    2 pages, later) must not take the free pages meanwhile, or a stream of small adapters could keep B
    waiting forever; D (base) and E (A's adapter) add no adapter and go."""
    pages = {"a": 2, "b": 4, "c": 2}

    class Pages:  # the scheduler's AdapterGate: a 4-page pool shared by LoRA adapters
        def group(self, seq):
            return None if seq.adapter_id is None else "pool"

        def admit(self, seq, running):
            if seq.adapter_id is None:
                return True
            resident = {s.adapter_id for s in running if s.adapter_id}
            return seq.adapter_id in resident or sum(pages[x] for x in resident) + pages[seq.adapter_id] <= 4

        def resident(self, seq):  # only running adapters are in the pool here
            return False

        def release(self, seq):
            pass

    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=256, adapters=Pages())
    seqs = {}
    for name, adapter in [("A", "a"), ("B", "b"), ("C", "c"), ("D", None), ("E", "a")]:
        seqs[name] = _seq(name, 3)
        seqs[name].adapter_id = adapter
        sched.add(seqs[name])
    assert {s.request_id for s in sched.schedule().seqs} == {"A", "D", "E"}
    for name in ("A", "D", "E"):
        sched.remove(seqs[name])
    assert [s.request_id for s in sched.schedule().seqs] == ["B"]
    sched.remove(seqs["B"])
    assert [s.request_id for s in sched.schedule().seqs] == ["C"]


def test_a_request_with_a_resident_adapter_passes_a_blocked_one_for_a_bounded_number_of_steps():
    """B's adapter b cannot get pages while A runs. Each step a new request arrives for another adapter that
    is already resident (it takes no pages): it goes ahead of B, until B has been passed over MAX_PASS_OVER
    steps; from then on its group waits behind B (a request for A's running adapter still goes). B runs as
    soon as A ends, before the waiting ones."""
    from server.engine.scheduler import MAX_PASS_OVER

    class Pool:
        def group(self, seq):
            return None if seq.adapter_id is None else "pool"

        def admit(self, seq, running):
            return seq.adapter_id != "b" or all(s.adapter_id != "a" for s in running)

        def resident(self, seq):
            return seq.adapter_id != "b"

        def release(self, seq):
            pass

    sched = Scheduler(BlockManager(num_blocks=512, block_size=4), max_num_seqs=64, max_num_batched_tokens=4096,
                      adapters=Pool())
    a, b = _seq("A", 3), _seq("B", 3)
    a.adapter_id, b.adapter_id = "a", "b"
    sched.add(a)
    sched.add(b)
    admitted = []
    for i in range(MAX_PASS_OVER + 3):
        c = _seq(f"C{i}", 3)
        c.adapter_id = f"c{i}"
        sched.add(c)
        batch = sched.schedule()
        admitted += [s.request_id for s in batch.seqs if s.num_computed == 0 and s.request_id.startswith("C")]
        for s in batch.seqs:
            s.num_computed += 3 if s.num_computed == 0 else 0
    assert admitted == [f"C{i}" for i in range(MAX_PASS_OVER)]
    assert b.passed_over == MAX_PASS_OVER and b.status is SequenceStatus.WAITING
    same = _seq("E", 3)
    same.adapter_id = "a"  # A's adapter: nothing new, it goes even now
    sched.add(same)
    assert "E" in [s.request_id for s in sched.schedule().seqs]
    sched.remove(a)
    sched.remove(same)
    first = [s.request_id for s in sched.schedule().seqs if s.num_computed == 0]
    assert first[0] == "B" and set(first) == {"B"} | {f"C{i}" for i in range(MAX_PASS_OVER, MAX_PASS_OVER + 3)}
