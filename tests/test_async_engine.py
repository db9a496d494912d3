"""The async API: concurrent streams, cancellation frees blocks at once, bounded queue, stats."""
from __future__ import annotations

import asyncio

import pytest

from server.config import EngineConfig
from server.engine.async_engine import AsyncEngine
from server.errors import QueueFullError
from server.engine.request import FinishReason, GenerateRequest, SamplingParams
from tests import smollm2

pytestmark = pytest.mark.slow  # the real SmolLM2 and its oracles: minutes, not seconds


@pytest.fixture(scope="module")
def llm():
    return smollm2.engine(EngineConfig(kv_cache_memory=32 << 20))


async def _collect(engine: AsyncEngine, req: GenerateRequest):
    ids, text, last = [], "", None
    async for out in engine.generate(req):
        ids += out.token_ids
        text += out.text
        last = out
    return ids, text, last


def test_concurrent_streams_match_sequential_runs(llm):
    prompts = ["The sky is", "Python is a programming language that", "1, 2, 3,"]

    async def main():
        eng = AsyncEngine(llm, max_queue=16)
        await eng.start()
        try:
            together = await asyncio.gather(*[
                _collect(eng, GenerateRequest(prompt=p, sampling=SamplingParams(max_new_tokens=12 + 3 * i)))
                for i, p in enumerate(prompts)])
            alone = [await _collect(eng, GenerateRequest(prompt=p, sampling=SamplingParams(max_new_tokens=12 + 3 * i)))
                     for i, p in enumerate(prompts)]
        finally:
            await eng.shutdown()
        return together, alone

    together, alone = asyncio.run(main())
    for (ids_t, text_t, last_t), (ids_a, text_a, _) in zip(together, alone):
        assert ids_t == ids_a and text_t == text_a
        assert last_t.finish_reason in (FinishReason.LENGTH, FinishReason.EOS)
        assert last_t.stats.generated_tokens == len(ids_t)
        assert last_t.stats.prompt_tokens > 0
        assert 0 <= last_t.stats.queue_time_s <= last_t.stats.time_to_first_token_s <= last_t.stats.e2e_latency_s
    assert llm.blocks.allocator.num_used == 0


def test_cancel_mid_stream_frees_blocks(llm):
    async def main():
        eng = AsyncEngine(llm, max_queue=4)
        await eng.start()
        try:
            gen = eng.generate(GenerateRequest(prompt="Tell me a long story about dragons.",
                                               sampling=SamplingParams(max_new_tokens=200, ignore_eos=True)))
            seen = 0
            async for out in gen:
                seen += len(out.token_ids)
                if seen >= 3:
                    break
            used_while_running = eng.stats().kv_blocks_used
            await gen.aclose()
            for _ in range(200):
                if eng.stats().kv_blocks_used == 0:
                    break
                await asyncio.sleep(0.01)
            return used_while_running, eng.stats()
        finally:
            await eng.shutdown()

    used, after = asyncio.run(main())
    assert used > 0
    assert after.kv_blocks_used == 0 and after.num_running == 0 and after.kv_usage == 0.0


def test_queue_full_is_refused():
    eng_cfg = EngineConfig(kv_cache_memory=8 << 20)

    async def main(llm):
        eng = AsyncEngine(llm, max_queue=2)
        # Not started: requests pile up in the inbox, so the waiting count is exact.
        eng._loop = asyncio.get_running_loop()
        gens = [eng.generate(GenerateRequest(prompt="hi", sampling=SamplingParams(max_new_tokens=2)))
                for _ in range(3)]
        first = [asyncio.ensure_future(g.__anext__()) for g in gens[:2]]
        await asyncio.sleep(0.05)
        assert eng.stats().num_waiting == 2
        with pytest.raises(QueueFullError, match="queue is full"):
            await gens[2].__anext__()
        for f in first:
            f.cancel()

    asyncio.run(main(smollm2.engine(eng_cfg)))


def test_burst_is_bounded_while_it_is_tokenized(llm):
    """Requests that arrive together all see an empty queue before any of them is tokenized: the bound counts
    the ones still being admitted, so a burst of 10 on a queue of 2 admits 2 and refuses 8 at once."""
    async def main():
        eng = AsyncEngine(llm, max_queue=2)
        await eng.start()
        try:
            return await asyncio.gather(*[
                _collect(eng, GenerateRequest(prompt=f"Item {i}:", sampling=SamplingParams(max_new_tokens=4,
                                                                                             ignore_eos=True)))
                for i in range(10)], return_exceptions=True)
        finally:
            await eng.shutdown()

    results = asyncio.run(main())
    refused = [r for r in results if isinstance(r, QueueFullError)]
    done = [r for r in results if not isinstance(r, BaseException)]
    assert len(refused) == 8 and len(done) == 2, results
    assert all(len(ids) == 4 and last.finish_reason == FinishReason.LENGTH for ids, _, last in done)
    assert llm.blocks.allocator.num_used == 0
