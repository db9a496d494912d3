"""Automatic prefix caching on a tiny random Llama (fast): outputs identical with caching on and off for the
base model and every adapter kind in mixed batches; a request never reuses KV that another adapter, another
task or an earlier load of the same adapter id computed; cached blocks outlive their request and are evicted
under pressure, never while in use; preemption and cancellation with shared blocks leak nothing."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from server.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.request import GenerateRequest, SamplingParams
from tests.tiny_models import ALL_LINEAR, CFG, CharTokenizer, adaption, ia3, lora, prompt, tiny_loaded
from tests.tiny_models import run_waves as run

BLOCK = 4
BYTES_PER_BLOCK = CFG.num_hidden_layers * 2 * BLOCK * CFG.num_key_value_heads * CFG.head_dim * 4  # fp32


def make_engine(root: Path, caching: bool, num_blocks: int = 512, **kw) -> LLMEngine:
    cfg = EngineConfig(adapter_root=str(root), kv_cache_memory=num_blocks * BYTES_PER_BLOCK, block_size=BLOCK,
                       device="cpu", quantize="none", enable_prefix_caching=caching, adapter_kv_fraction=0.5, **kw)
    engine = LLMEngine(cfg, tiny_loaded(CharTokenizer(), scale=0.2))
    for a in sorted(p.name for p in root.iterdir()):
        engine.adapters.load(a)
    return engine


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("adapters")
    lora(r / "lora-a", rank=4, seed=1)
    lora(r / "lora-b", rank=4, seed=2)
    lora(r / "lora-all", rank=8, targets=ALL_LINEAR, seed=3)
    prompt(r / "prefix", nvt=6, kind="PREFIX_TUNING")
    prompt(r / "prefix-2", nvt=6, kind="PREFIX_TUNING")
    prompt(r / "prompt", nvt=5)
    prompt(r / "multitask", nvt=4, kind="MULTITASK_PROMPT_TUNING")
    ia3(r / "ia3")
    adaption(r / "adaption")
    return r


ADAPTERS = [None, "lora-a", "lora-b", "lora-all", "prefix", "prefix-2", "prompt", "multitask", "ia3", "adaption"]
SYSTEM = [(7 * i + 3) % 60 + 3 for i in range(23)]  # a shared "system prompt" of 23 tokens


def req(rid: str, ids: list[int], adapter: str | None, n: int = 6, task: int | None = None) -> GenerateRequest:
    return GenerateRequest(prompt_token_ids=ids, adapter_id=adapter, task_id=task, request_id=rid,
                           sampling=SamplingParams(max_new_tokens=n, ignore_eos=True))


def mixed_waves() -> list[list[GenerateRequest]]:
    waves = []
    for w in range(3):  # the same system prompt in every wave; wave 2 repeats wave 0's prompts exactly
        wave = []
        for i, a in enumerate(ADAPTERS):
            tail = [(w % 2) * 5 + i + 3, 40 + i, 11]
            wave.append(req(f"w{w}-{a}", SYSTEM + tail, a))
        wave += [req(f"w{w}-multitask-t{t}", SYSTEM + [9, t + 3], "multitask", task=t) for t in (1, 2)]
        waves.append(wave)
    return waves


def test_outputs_identical_with_caching_on_and_off_for_every_kind_in_mixed_batches(root):
    off, on = make_engine(root, False), make_engine(root, True)
    want = run(off, mixed_waves())
    got = run(on, mixed_waves())
    assert got == want
    assert off.blocks.prefix_hits == 0
    # waves 1 and 2 found the system prompt's full blocks (and wave 2 its whole prompt but the last position)
    assert on.blocks.prefix_hits >= 2 * len(mixed_waves()[0]) * (len(SYSTEM) // BLOCK) * BLOCK
    assert on.blocks.allocator.num_used == 0 and on.blocks.allocator.num_cached > 0


def test_no_request_reuses_kv_of_another_adapter_task_or_an_earlier_load(root, tmp_path):
    engine = make_engine(root, True)
    ids = SYSTEM[:20]  # 20 positions: at most 4 full blocks (16 positions) can be reused

    def gen(rid, adapter, task=None):
        hits = engine.blocks.prefix_hits
        tokens = run(engine, [[req(rid, ids, adapter, task=task)]])[rid]
        return tokens, engine.blocks.prefix_hits - hits

    a1, hit = gen("a1", "lora-a")
    assert hit == 0
    assert gen("b1", "lora-b")[1] == 0  # the same prompt, another adapter: nothing of a's
    assert gen("base", None)[1] == 0
    assert gen("a2", "lora-a") == (a1, 16)  # a again: its own blocks
    assert gen("p1", "prefix")[1] == 0 and gen("p2", "prefix-2")[1] == 0  # virtual tokens are per adapter too
    assert gen("p1-again", "prefix")[1] == 24  # 6 virtual + 20 prompt positions: 6 full blocks
    assert gen("t0", "multitask", 0)[1] == 0 and gen("t1", "multitask", 1)[1] == 0  # and per task
    # the id reloaded from another adapter's files: none of the old KV, and the new adapter's tokens
    b2, _ = gen("b2", "lora-b")
    engine.adapters.unload("lora-a")
    other = tmp_path / "elsewhere"
    shutil.copytree(root / "lora-b", other)
    engine.adapters.load("lora-a", other)
    assert gen("a3", "lora-a") == (b2, 0)
    # reloaded from its own files again: still a new instance, nothing reused
    engine.adapters.unload("lora-a")
    engine.adapters.load("lora-a", root / "lora-a")
    assert gen("a4", "lora-a") == (a1, 0)


def _check_blocks(engine: LLMEngine) -> None:
    """Every block in a live table is in use (never evictable); reference counts are exactly the tables'."""
    alloc = engine.blocks.allocator
    refs = [0] * alloc.num_blocks
    for seq in engine.requests.values():
        assert len(set(seq.block_table)) == len(seq.block_table)
        for b in seq.block_table:
            refs[b] += 1
    assert refs == alloc.ref_counts
    assert all(alloc.ref_counts[b] == 0 and alloc.block_hash[b] is not None for b in alloc._evictable)
    assert all(alloc.block_hash[b] == h for h, b in alloc.cached.items())


def test_pressure_preemption_and_cancellation_leak_nothing_and_change_no_output(root):
    """A 40-block cache, 8 running sequences over 3 system prompts and 5 adapters; some requests are cancelled
    mid-run. Every finished request equals the same request run alone without caching."""
    rnd = random.Random(0)
    systems = [[rnd.randrange(3, 63) for _ in range(n)] for n in (17, 26, 9)]
    adapters = [None, "lora-a", "lora-all", "prefix", "prompt"]
    reqs = []
    for i in range(36):
        ids = systems[i % 3] + [rnd.randrange(3, 63) for _ in range(rnd.randrange(1, 7))]
        reqs.append(req(f"r{i}", ids, adapters[rnd.randrange(len(adapters))], n=rnd.randrange(4, 14)))
    engine = make_engine(root, True, num_blocks=40, max_num_seqs=8, max_num_batched_tokens=64)
    out = {r.request_id: [] for r in reqs}
    pending = list(reqs)
    cancelled = set()
    steps = 0
    while pending or engine.has_work():
        while pending and len(engine.requests) < 12:
            r = pending.pop(0)
            engine.add(engine.make_sequence(r))
        for o in engine.step():
            out[o.request_id] += o.token_ids
        steps += 1
        if steps % 7 == 0 and engine.scheduler.running:  # cancel a running request that shares blocks
            victim = engine.scheduler.running[len(engine.scheduler.running) // 2]
            cancelled.add(victim.request_id)
            engine.abort(victim.request_id)
        _check_blocks(engine)
        assert steps < 2000
    alloc = engine.blocks.allocator
    assert alloc.num_used == 0 and sum(alloc.ref_counts) == 0
    assert engine.scheduler.num_preemptions > 0 and alloc.num_evictions > 0 and engine.blocks.prefix_hits > 0
    assert len(cancelled) >= 3
    alone = make_engine(root, False)
    for r in reqs:
        if r.request_id not in cancelled:
            assert out[r.request_id] == run(alone, [[r]])[r.request_id], r.request_id


def test_cached_blocks_outlive_their_request_and_idle_ones_are_evicted_least_recent_first(root):
    engine = make_engine(root, True, num_blocks=12)
    alloc = engine.blocks.allocator
    first = SYSTEM[:17]  # 4 full blocks + 1
    run(engine, [[req("a", first, None, n=3)]])
    assert alloc.num_used == 0 and alloc.num_cached == 4  # the 5th block (17-19) filled up only partly
    hits = engine.blocks.prefix_hits
    run(engine, [[req("a-again", first, None, n=3)]])
    assert engine.blocks.prefix_hits - hits == 16
    # a request needing all 12 blocks evicts every idle cached block; none of them was in use
    big = [(5 * i) % 60 + 3 for i in range(44)]
    run(engine, [[req("big", big, None, n=4)]])
    assert alloc.num_evictions >= 4 and alloc.num_used == 0
    hits = engine.blocks.prefix_hits
    run(engine, [[req("a-third", first, None, n=3)]])
    assert engine.blocks.prefix_hits == hits  # a's blocks were evicted


def test_retired_adapter_kv_is_freed_at_the_next_step(root):
    engine = make_engine(root, True)
    run(engine, [[req("p", SYSTEM, "prefix"), req("l", SYSTEM, "lora-a")]])
    alloc = engine.blocks.allocator
    assert alloc.virtual and alloc.num_cached > 0
    for a in ("prefix", "lora-a"):
        engine.adapters.unload(a)
    run(engine, [[req("base", [5, 6, 7], None, n=1)]])
    assert not alloc.virtual and all(s in (None, b"") for s in alloc.block_salt)
