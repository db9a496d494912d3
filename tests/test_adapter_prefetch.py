"""Issue 19, on a tiny random Llama (fast): the LoRA adapters that queued requests wait for are copied into
the device pool by the prefetch thread while the batch runs, so admission finds them resident; outputs are
the same with prefetch on and off; an adapter unloaded or dropped while it is being copied gives its pages
back; and a request whose adapter can run without new pages passes an older blocked one, but only for a
bounded number of steps."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from server.adapters import manager as manager_module
from server.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.request import GenerateRequest, SamplingParams
from tests.tiny_models import CFG, CharTokenizer, lora, run_waves, tiny_loaded

NAMES = [f"lora-{i}" for i in range(6)]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate(NAMES):
        lora(r / name, rank=4, seed=i + 1)
    return r


class Copies:
    """The manager's observer: host -> device copies made at admission, in the engine thread."""

    def __init__(self):
        self.at_admission = 0

    def adapter_loaded(self, source: str, seconds: float) -> None:
        self.at_admission += source == "host"

    def adapter_load_failed(self, reason: str) -> None:
        pass


def make_engine(root: Path, prefetch: bool, pool_adapters: int = 4, max_loras: int = 2) -> LLMEngine:
    probe = LLMEngine(EngineConfig(adapter_root=str(root), device="cpu", quantize="none"), tiny_loaded())
    pages = probe.adapters.load(NAMES[0]).host.num_pages
    page_bytes = probe.adapters.pool.page_size * 4
    cfg = EngineConfig(adapter_root=str(root), device="cpu", quantize="none", max_loras=max_loras,
                       adapter_memory=pool_adapters * pages * page_bytes, adapter_prefetch=prefetch)
    engine = LLMEngine(cfg, tiny_loaded(CharTokenizer(), scale=0.2))
    for name in NAMES:
        engine.adapters.load(name)
    engine.adapters.observer = Copies()
    return engine


def requests() -> list[GenerateRequest]:
    return [GenerateRequest(prompt_token_ids=[3 + i, 17, 5 + 2 * i], adapter_id=NAMES[i % len(NAMES)],
                            request_id=f"r{i}", sampling=SamplingParams(max_new_tokens=6 + i % 3, ignore_eos=True))
            for i in range(12)]


def run(engine: LLMEngine) -> dict[str, list[int]]:
    def settle(e: LLMEngine) -> None:  # deterministic: each step's prefetches land before the next
        assert e.prefetcher is None or e.prefetcher.wait_idle()
    return run_waves(engine, [requests()], check=settle)


def test_queued_requests_adapters_are_prefetched_and_outputs_do_not_change(root):
    """--max-loras 2 over six adapters with a pool of four: while two adapters run, the next ones in the queue
    go into the free pages; their requests are then admitted without a copy in the engine thread."""
    off, on = make_engine(root, prefetch=False), make_engine(root, prefetch=True)
    want = run(off)
    got = run(on)
    assert got == want and all(len(v) >= 6 for v in got.values())
    alone = {r.request_id: run_alone(root, r) for r in requests()[:4]}
    assert all(got[k] == v for k, v in alone.items())
    assert off.adapters.num_prefetched == 0 and off.adapters.observer.at_admission >= len(NAMES)
    assert on.adapters.num_prefetched >= len(NAMES) - 2  # all but the first two were staged ahead
    assert on.adapters.observer.at_admission <= 2
    for e in (off, on):
        assert e.blocks.allocator.num_used == 0
        assert all(x.refs == 0 and x.pins == 0 and not x.staging for x in e.adapters.entries.values())
    stats = on.adapters
    assert stats.pool.num_used == sum(x.host.num_pages for x in stats.entries.values() if x.device is not None)


def run_alone(root: Path, r: GenerateRequest) -> list[int]:
    engine = LLMEngine(EngineConfig(adapter_root=str(root), device="cpu", quantize="none"),
                       tiny_loaded(CharTokenizer(), scale=0.2))
    engine.adapters.load(r.adapter_id)
    return run_waves(engine, [[r]])[r.request_id]


@pytest.mark.parametrize("how", ["unload", "host-drop"])
def test_an_adapter_unloaded_or_dropped_while_it_is_copied_gives_its_pages_back(root, monkeypatch, how):
    """The copy is held mid-way; meanwhile the adapter is unloaded (or dropped from host memory). When the copy
    ends, its pages return to the pool, it is not resident, and the id serves again after a reload."""
    engine = make_engine(root, prefetch=True)
    mgr = engine.adapters
    entered, go = threading.Event(), threading.Event()
    real_place = manager_module.place

    def slow_place(*a, **kw):
        entered.set()
        assert go.wait(10)
        return real_place(*a, **kw)

    monkeypatch.setattr(manager_module, "place", slow_place)
    entry = mgr.get(NAMES[3])
    t = threading.Thread(target=mgr.prefetch, args=(entry,))
    t.start()
    assert entered.wait(10)
    assert entry.staging and mgr.pool.num_used == entry.host.num_pages
    assert not mgr.make_resident(NAMES[3])  # not resident until the copy is done
    if how == "unload":
        mgr.unload(NAMES[3])
    else:
        with mgr._lock:
            mgr._make_host_room("other", mgr.host_limit, None)  # a new adapter wants all of host memory
        assert entry.host is None
    go.set()
    t.join(10)
    assert mgr.pool.num_used == 0 and entry.device is None and not entry.staging
    monkeypatch.setattr(manager_module, "place", real_place)
    mgr.load(NAMES[3])
    got = run_waves(engine, [[GenerateRequest(prompt_token_ids=[4, 17, 5], adapter_id=NAMES[3], request_id="x",
                                                sampling=SamplingParams(max_new_tokens=6, ignore_eos=True))]])
    assert got["x"] == run_alone(root, GenerateRequest(prompt_token_ids=[4, 17, 5], adapter_id=NAMES[3],
                                                       request_id="x",
                                                       sampling=SamplingParams(max_new_tokens=6, ignore_eos=True)))


def test_prefetch_never_evicts_what_a_request_holds(root):
    """A pool of two adapters, both held by queued or running requests: the prefetcher has no room and takes
    none (the engine's own admission path still serves everything)."""
    engine = make_engine(root, prefetch=True, pool_adapters=2, max_loras=1)
    reqs = [GenerateRequest(prompt_token_ids=[3, 4, 5], adapter_id=NAMES[i], request_id=f"p{i}",
                            sampling=SamplingParams(max_new_tokens=5, ignore_eos=True)) for i in range(3)]
    for r in reqs:
        engine.add(engine.make_sequence(r))
    engine.step()  # p0 runs (pinned); p1 and p2 wait: p1 is prefetched into the one free slot
    assert engine.prefetcher.wait_idle()
    mgr = engine.adapters
    held = {n for n in NAMES[:3] if mgr.get(n).device is not None}
    assert held == {NAMES[0], NAMES[1]} and mgr.num_prefetched == 1
    engine.step()
    assert engine.prefetcher.wait_idle()
    assert mgr.get(NAMES[1]).device is not None  # p2's prefetch could not evict p1's adapter
    while engine.has_work():
        engine.step()
    assert all(x.refs == 0 and x.pins == 0 for x in mgr.entries.values())
    assert CFG.num_hidden_layers == 2  # (the tiny model: every adapter is the same size)



def test_an_on_demand_load_stages_the_adapter_in_its_worker_thread(root):
    """Through the async engine: a request for an adapter not yet loaded reads it in a worker thread and puts it
    into device pages there (no copy at admission, in the engine thread), and streams the engine's tokens."""
    import asyncio

    from server.engine.async_engine import AsyncEngine

    engine = LLMEngine(EngineConfig(adapter_root=str(root), device="cpu", quantize="none"),
                       tiny_loaded(CharTokenizer(), scale=0.2))
    engine.adapters.observer = Copies()
    r = GenerateRequest(prompt_token_ids=[5, 17, 9], adapter_id=NAMES[2], request_id="od",
                        sampling=SamplingParams(max_new_tokens=6, ignore_eos=True))

    async def main():
        ae = AsyncEngine(engine)
        await ae.start()
        try:
            return [t async for o in ae.generate(r) for t in o.token_ids]
        finally:
            await ae.shutdown()

    assert asyncio.run(main()) == run_alone(root, r)
    assert engine.adapters.num_prefetched == 1 and engine.adapters.observer.at_admission == 0


def test_under_tier_pressure_no_running_request_misses_a_step(root):
    """Six adapters through a pool of two, --max-loras 2, requests arriving at random steps, prefetch on: every
    step, every request that was decoding before it gets its next token (nothing waits on loads or copies), and
    every request ends with the tokens it gets alone."""
    import random

    engine = make_engine(root, prefetch=True, pool_adapters=2, max_loras=2)
    rnd = random.Random(5)
    pending = [GenerateRequest(prompt_token_ids=[rnd.randrange(3, 60) for _ in range(rnd.randrange(2, 6))],
                               adapter_id=rnd.choice(NAMES), request_id=f"q{i}",
                               sampling=SamplingParams(max_new_tokens=rnd.randrange(3, 8), ignore_eos=True))
               for i in range(16)]
    alone = LLMEngine(EngineConfig(adapter_root=str(root), device="cpu", quantize="none"),
                      tiny_loaded(CharTokenizer(), scale=0.2))
    for name in NAMES:
        alone.adapters.load(name)
    want = {}
    for r in pending:  # one at a time
        want.update(run_waves(alone, [[r]]))
    out = {r.request_id: [] for r in pending}
    queue, steps, checked = list(pending), 0, 0
    while queue or engine.has_work():
        while queue and rnd.random() < 0.4:
            engine.add(engine.make_sequence(queue.pop(0)))
        decoding = {s.request_id: s.num_generated for s in engine.scheduler.running
                    if s.num_uncomputed == 1 and not s.finished}
        for o in engine.step():
            out[o.request_id] += o.token_ids
        steps += 1
        for rid, before in decoding.items():
            seq = engine.requests.get(rid)
            assert seq is None or seq.num_generated == before + 1, (rid, steps)  # finished, or one token further
            checked += 1
        assert steps < 500
    assert out == want and checked > 30
    assert engine.adapters.num_evictions > 0  # the pool really was too small for all of them
    assert all(x.refs == 0 and x.pins == 0 and not x.staging for x in engine.adapters.entries.values())


def test_debug_log_has_one_line_per_step_with_its_adapters_and_timings(root, caplog):
    """--log-level DEBUG: each step says what ran (sequences, decodes, tokens, distinct adapters, queue) and where
    its time went, and the pool's eviction and prefetch counts beside it (bench/RESULTS.md reads these)."""
    import logging
    import re

    engine = make_engine(root, prefetch=True, pool_adapters=2)
    steps = 0
    with caplog.at_level(logging.DEBUG, logger="tessera.engine.steps"):
        for r in requests()[:4]:
            engine.add(engine.make_sequence(r))
        while engine.has_work():
            engine.step()
            steps += 1
    engine.prefetcher.close()
    lines = [m for m in caplog.messages if m.startswith("step: ")]
    assert 0 < len(lines) <= steps
    pat = re.compile(r"step: (\d+) seqs \((\d+) decode\) (\d+) tokens, (\d+) adapters, (\d+) waiting, (\d+) outputs: "
                     r"schedule [\d.]+ ms, forward [\d.]+ ms, sample [\d.]+ ms, total [\d.]+ ms; pool \d+ free "
                     r"pages, (\d+) evictions, (\d+) prefetched")
    parsed = [tuple(map(int, pat.fullmatch(m).groups())) for m in lines]
    first = parsed[0]
    assert first[0] == 2 and first[1] == 0 and first[2] == 6 and first[3] == 2  # max_loras 2: two prefills
    assert first[4] == 2  # the other two wait
    assert all(n_adapters <= n_seqs <= 2 and decodes <= n_seqs for n_seqs, decodes, _, n_adapters, *_ in parsed)
    assert sum(p[5] for p in parsed) == sum(6 + i % 3 for i in range(4))  # an output per token
    assert parsed[-1][6] >= 2  # a pool of two adapters took four: the first two were evicted
