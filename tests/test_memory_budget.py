"""Issue 19, one memory budget (S-LoRA's unified paging), on a tiny random Llama: with --memory-budget the KV
cache and the adapter pool share one buffer, idle KV blocks hold adapter pages and come back when sequences
need them, pinned adapters are never taken from, the existing flags bound each share, and the tokens are
those of two fixed pools."""
from __future__ import annotations

import pytest
import torch

from server.adapters.pool import PagePool
from server.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.request import GenerateRequest, SamplingParams
from tests.tiny_models import CharTokenizer, lora, run_waves, tiny_loaded

NAMES = [f"lora-{i}" for i in range(6)]
BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4  # the tiny Llama: layers * K/V * block_size * KV heads * head_dim * fp32


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate(NAMES):
        lora(r / name, rank=4, seed=i + 1, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    return r


def engine_for(root, **cfg) -> LLMEngine:
    e = LLMEngine(EngineConfig(adapter_root=str(root), device="cpu", quantize="none", max_loras=3, **cfg),
                  tiny_loaded(CharTokenizer(), scale=0.2))
    for name in NAMES:
        e.adapters.load(name)
    return e


def requests(n: int = 12, new: int = 20) -> list[GenerateRequest]:
    return [GenerateRequest(prompt_token_ids=[3 + i, 17, 5 + 2 * i] * 5, adapter_id=NAMES[i % len(NAMES)],
                            request_id=f"r{i}", sampling=SamplingParams(max_new_tokens=new, ignore_eos=True))
            for i in range(n)]


class Invariants:
    """After every step: the two shares add up to the budget, the pool holds exactly the lent blocks' pages,
    every pinned or staging adapter's pages lie in lent blocks, and each share stays within its bound."""

    def __init__(self):
        self.max_pool = self.min_kv = 0
        self.min_kv = None

    def __call__(self, e: LLMEngine) -> None:
        assert e.prefetcher.wait_idle()
        a, pool, mem = e.blocks.allocator, e.adapters.pool, e.memory
        assert a.capacity + len(a.lent) == a.num_blocks
        assert pool.capacity == len(a.lent) * mem.pages_per_block <= pool.max_pages
        assert a.capacity <= mem.kv_max_blocks
        lent = torch.tensor(sorted(a.lent), dtype=torch.int64)
        for x in e.adapters.entries.values():
            if x.pages is not None:
                assert torch.isin(mem.block_of(x.pages), lent).all(), x.adapter_id
        for s in e.scheduler.running:
            assert not set(s.block_table) & a.lent
        self.max_pool = max(self.max_pool, pool.capacity)
        self.min_kv = a.capacity if self.min_kv is None else min(self.min_kv, a.capacity)


def test_pool_pages_are_granted_and_revoked_only_when_free():
    buf = torch.zeros(8 * 4)
    pool = PagePool(8, 4, torch.float32, torch.device("cpu"), shared=buf, max_pages=6)
    assert pool.capacity == pool.num_free == 0 and pool.max_pages == 6
    pool.grant(torch.tensor([4, 5, 6]))
    pool.grant(torch.tensor([0, 1]))
    assert pool.capacity == pool.num_free == 5
    got = pool.allocate(3)
    assert got.tolist() == [4, 5, 6]
    assert pool.free_in(torch.tensor([0, 1, 4, 5])) == 2
    assert not pool.revoke(torch.tensor([4, 5, 6]))  # in use: nothing changes
    assert pool.capacity == 5 and pool.num_free == 2
    pool.write(got, torch.arange(12.0))
    assert buf[16:28].tolist() == list(range(12))  # the pool's pages are the shared buffer's elements
    pool.free(got)
    assert pool.revoke(torch.tensor([5]))  # the middle of a free run
    assert pool.capacity == pool.num_free == 4 and pool.allocate(2).tolist() == [0, 1]
    assert pool.revoke(torch.tensor([4, 6])) and pool.capacity == 2 and pool.num_free == 0


def test_one_budget_lends_and_reclaims_and_tokens_equal_two_fixed_pools(root):
    """A budget too small for the KV cache and every adapter at once: the pool borrows idle blocks, the cache
    takes them back as sequences grow, and every request's tokens equal those of two fixed pools."""
    want = run_waves(engine_for(root), [requests()])
    e = engine_for(root, memory_budget=25 * BLOCK_BYTES)
    check = Invariants()
    got = run_waves(e, [requests()], check=check)
    assert got == want and all(len(v) == 20 for v in got.values())
    assert e.memory.num_lent > 0 and e.memory.num_reclaimed > 0
    assert check.max_pool > 0 and check.min_kv < e.blocks.allocator.num_blocks
    assert all(x.refs == 0 and x.pins == 0 and not x.staging for x in e.adapters.entries.values())


def test_idle_adapters_give_way_to_a_long_request(root):
    """Every adapter resident and idle, the cache's share shrunk: a base request needing most of the budget
    runs without a preemption, by evicting idle adapters (their host copies stay)."""
    e = engine_for(root, memory_budget=34 * BLOCK_BYTES)  # the tiny Llama's context is 32 blocks
    for name in NAMES:
        assert e.adapters.make_resident(name)
    lent = len(e.blocks.allocator.lent)
    assert lent > 0 and e.adapters.tier_counts()["device"] == len(NAMES)
    n = (e.blocks.allocator.num_blocks - 4) * 16
    r = GenerateRequest(prompt_token_ids=[(7 * i) % 50 + 3 for i in range(n - 8)], request_id="long",
                        sampling=SamplingParams(max_new_tokens=8, ignore_eos=True))
    out = run_waves(e, [[r]])
    assert len(out["long"]) == 8 and e.scheduler.num_preemptions == 0
    assert e.memory.num_reclaimed > 0 and e.adapters.num_evictions > 0
    assert e.adapters.tier_counts()["device"] < len(NAMES)
    assert {i["adapter_id"] for i in e.list_adapters()} == set(NAMES)  # evicted to host, not lost


def test_existing_flags_bound_each_share(root):
    """--kv-cache-memory and --adapter-memory bound the shares of one budget; requests larger than the KV bound
    are refused by name."""
    e = engine_for(root, memory_budget=40 * BLOCK_BYTES, kv_cache_memory=30 * BLOCK_BYTES,
                   adapter_memory=12 * BLOCK_BYTES)
    a = e.blocks.allocator
    # ten blocks are beyond the KV bound: the pool's from the start; idle ones join it up to its bound
    assert e.memory.kv_max_blocks == 30 and len(a.lent) == e.memory.max_lent == 12 and a.capacity == 28
    check = Invariants()
    got = run_waves(e, [requests()], check=check)
    assert all(len(v) == 20 for v in got.values())
    assert check.max_pool <= 12 * e.memory.pages_per_block
    from server.errors import InvalidRequestError
    with pytest.raises(InvalidRequestError, match="needs 31 KV blocks but the cache has 30.*--memory-budget"):
        e.make_sequence(GenerateRequest(prompt_token_ids=[5] * (30 * 16 - 4), request_id="big",
                                        sampling=SamplingParams(max_new_tokens=8)))


def test_a_budget_needs_the_pool_in_the_models_dtype(root):
    with pytest.raises(ValueError, match="lora_dtype must be the model's dtype"):
        engine_for(root, memory_budget=40 * BLOCK_BYTES, lora_dtype="bfloat16")


def test_pool_pages_of_a_block_are_that_blocks_kv_memory(root):
    """Block-major page ids: block b's ids map one-to-one onto the rows of b's strips of every layer's keys and
    values, so an adapter written to them overwrites only that block's slots."""
    e = engine_for(root, memory_budget=12 * BLOCK_BYTES)
    mem, pool, kv = e.memory, e.adapters.pool, e.runner.kv_cache
    rows = mem.physical(torch.arange(12 * mem.pages_per_block))
    assert sorted(rows.tolist()) == list(range(pool.num_pages))  # a bijection onto the buffer's rows
    b = 5
    saved = kv.clone()
    pool.buffer[mem.physical(mem.block_pages(b))] = 7.0
    changed = (kv != saved).view(*kv.shape[:2], 12, 16, *kv.shape[3:]).any(-1).any(-1).any(-1)  # [L, 2, blocks]
    assert changed[:, :, b].all() and not changed[:, :, [i for i in range(12) if i != b]].any()
