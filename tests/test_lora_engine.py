"""LoRA-family adapters made by PEFT on the real SmolLM2, served by the engine in mixed batches:
greedy tokens identical to PEFT running each adapter alone; a pool that holds two adapters still
serves eight in rotation; every page comes back."""
from __future__ import annotations

import pytest

from server.config import EngineConfig
from server.engine.engine import LLMEngine
from server.errors import AdapterNotFoundError
from server.engine.request import FinishReason, GenerateRequest, SamplingParams
from tests import smollm2
from tests.peft_adapters import NAMES, build_all, peft_greedy

pytestmark = pytest.mark.slow  # the real SmolLM2 and its oracles: minutes, not seconds

PROMPTS = ["The three most important things about", "def fibonacci(n):\n"]
N_NEW = 12


@pytest.fixture(scope="module")
def root():
    return build_all()


def run(engine: LLMEngine, work: list[tuple[str | None, list[int]]], every: int = 1) -> list[list[int]]:
    """Add requests staggered (one every `every` steps) and run to completion -> generated ids each."""
    seqs, out, i, step = [], {}, 0, 0
    while i < len(work) or engine.has_work():
        if i < len(work) and step % every == 0:
            adapter, ids = work[i]
            s = engine.make_sequence(GenerateRequest(prompt_token_ids=ids, adapter_id=adapter,
                                                     sampling=SamplingParams(max_new_tokens=N_NEW)))
            engine.add(s)
            seqs.append(s)
            i += 1
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
            assert o.finish_reason is not FinishReason.ERROR, o.error
        step += 1
    return [out[s.request_id] for s in seqs]


def test_mixed_adapter_batch_equals_peft(root):
    engine = smollm2.engine(EngineConfig(adapter_root=str(root)))
    for name in NAMES:
        engine.adapters.load(name)
    kinds = {i["adapter_id"]: i["kind"] for i in engine.adapters.infos()}
    assert kinds["dora-r8"] == "dora" and kinds["adalora"] == "adalora" and kinds["r4-qv"] == "lora"
    work = [(name, engine.tokenizer(p).input_ids) for p in PROMPTS for name in (None, *NAMES)]
    got = run(engine, work, every=1)
    base = {tuple(ids): peft_greedy(None, tuple(ids), N_NEW) for _, ids in work}
    for (name, ids), tokens in zip(work, got):
        want = peft_greedy(name, tuple(ids), N_NEW)
        assert tokens == want, f"adapter {name}"
        if name is not None:
            assert want != base[tuple(ids)] or name in ("r64-mlp",), f"{name} does not change the output: weak test"
    assert engine.blocks.allocator.num_used == 0
    assert all(i["pins"] == 0 and i["active_requests"] == 0 for i in engine.adapters.infos())

def test_lora_dtype_bfloat16_from_the_cli_builds_a_bf16_pool_read_by_the_cpu_kernels(root):
    """`--lora-dtype bfloat16` through the server's own parser and config: a bf16 pool with twice the pages
    for the same bytes, read by the C++ SGMV, serving a mixed batch to the end. (Exactness of bf16 pages
    against PEFT is tests/test_lora_kernel_batch.py's bf16-exact test; rounding random fp32 adapters to
    bf16 may move a greedy token late in a generation, so tokens are not compared here.)"""
    import torch

    from kernels import lora_cpu
    from server.cli import build_parser, configs

    cfg, _ = configs(build_parser().parse_args(["--adapter-root", str(root), "--lora-dtype", "bfloat16"]))
    engine = smollm2.engine(cfg)
    pool = engine.adapters.pool
    assert pool.buffer.dtype == torch.bfloat16 and pool.num_pages * pool.page_size * 2 == pool.nbytes
    assert pool.nbytes <= cfg.adapter_pool_bytes < pool.num_pages * pool.page_size * 4
    if lora_cpu.available():
        assert engine.runner.lora_batch.keywords["ops"] == (lora_cpu.cpu_lora_shrink, lora_cpu.cpu_lora_expand,
                                                            lora_cpu.cpu_lora_apply)
    names = ("r4-qv", "r8-all-linear", "dora-r8")
    for name in names:
        engine.adapters.load(name)
    info = {i["adapter_id"]: i for i in engine.adapters.infos()}
    flat = engine.adapters.entries["r4-qv"].host.flat
    assert flat.dtype == torch.bfloat16 and info["r4-qv"]["bytes"] == flat.numel() * 2  # ListAdapters' size
    work = [(name, engine.tokenizer(p).input_ids) for p in PROMPTS for name in names]
    got = run(engine, work, every=1)
    assert all(len(t) == N_NEW for t in got)
    assert engine.blocks.allocator.num_used == 0



def test_pool_of_two_serves_eight_in_rotation(root):
    names = [n for n in NAMES if n != "r64-mlp"][:8]
    probe = smollm2.engine(EngineConfig(adapter_root=str(root)))
    sizes = {n: probe.adapters.load(n).nbytes for n in names}
    two = 2 * max(sizes.values())  # room for the two largest at once, not for all eight
    engine = smollm2.engine(EngineConfig(adapter_root=str(root), adapter_memory=two + 4096))
    for n in names:
        engine.adapters.load(n)
    prompt = engine.tokenizer(PROMPTS[0]).input_ids
    work = [(names[i % len(names)], prompt) for i in range(2 * len(names))]
    got = run(engine, work, every=2)
    for (name, ids), tokens in zip(work, got):
        assert tokens == peft_greedy(name, tuple(ids), N_NEW), name
    assert engine.adapters.num_evictions >= len(names) - 2  # they really rotated through the pool
    assert engine.adapters.pool.num_used > 0
    for n in names:
        engine.adapters.unload(n)
    assert engine.adapters.pool.num_used == 0 and engine.adapters.infos() == []


def test_unload_while_requests_run_lets_them_finish(root):
    engine = smollm2.engine(EngineConfig(adapter_root=str(root)))
    engine.adapters.load("r4-qv")
    ids = engine.tokenizer(PROMPTS[0]).input_ids
    seqs = [engine.make_sequence(GenerateRequest(prompt_token_ids=ids, adapter_id="r4-qv",
                                                 sampling=SamplingParams(max_new_tokens=N_NEW))) for _ in range(2)]
    for s in seqs:
        engine.add(s)
    out = {}
    for o in engine.step():
        out.setdefault(o.request_id, []).extend(o.token_ids)
    assert engine.adapters.unload("r4-qv") == 2  # both still running
    with pytest.raises(AdapterNotFoundError):
        engine.make_sequence(GenerateRequest(prompt_token_ids=ids, adapter_id="r4-qv"))
    while engine.has_work():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
    want = peft_greedy("r4-qv", tuple(ids), N_NEW)
    assert all(out[s.request_id] == want for s in seqs)
    assert engine.adapters.pool.num_used == 0 and engine.adapters.get("r4-qv") is None


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_mixed_adapters_on_requantized_base_equal_peft_on_same_weights(root, quantize):
    from tests.peft_adapters import peft_greedy_on_weights

    engine = smollm2.engine(EngineConfig(adapter_root=str(root), quantize=quantize, quant_group_size=64))
    names = ["r8-all-linear", "dora-r8", "adalora"]
    for name in names:
        engine.adapters.load(name)
    ids = engine.tokenizer(PROMPTS[0]).input_ids
    got = run(engine, [(n, ids) for n in (None, *names)])
    for name, tokens in zip((None, *names), got):
        assert tokens == peft_greedy_on_weights(engine.model.linear_weight, name, ids, N_NEW), name


def test_open_traffic_over_more_adapters_than_memory_holds(root):
    """Issue 19: a pool that holds two adapters and a host tier that holds three, eight adapters, requests
    arriving at random times through the async engine (on-demand loads from --adapter-root). Every request
    completes with PEFT's tokens: an adapter that exists on disk is never refused because memory is busy
    with other requests' adapters; it waits for room."""
    import asyncio
    import random

    from server.engine.async_engine import AsyncEngine

    names = [n for n in NAMES if n != "r64-mlp"][:8]
    probe = smollm2.engine(EngineConfig(adapter_root=str(root)))
    sizes = sorted(probe.adapters.load(n).nbytes for n in names)
    engine = smollm2.engine(EngineConfig(adapter_root=str(root), adapter_memory=2 * sizes[-1] + 4096,
                                         adapter_host_memory=sum(sizes[-3:]) + 4096))
    prompts = [tuple(engine.tokenizer(p).input_ids) for p in PROMPTS]
    rnd = random.Random(3)
    work = [(rnd.choice(names), rnd.choice(prompts), rnd.uniform(0, 3)) for _ in range(24)]

    async def main():
        ae = AsyncEngine(engine)
        await ae.start()

        async def one(name, ids, delay):
            await asyncio.sleep(delay)
            out = []
            async for o in ae.generate(GenerateRequest(prompt_token_ids=list(ids), adapter_id=name,
                                                       sampling=SamplingParams(max_new_tokens=N_NEW))):
                assert o.finish_reason is not FinishReason.ERROR, o.error
                out += o.token_ids
            return out

        try:
            return await asyncio.gather(*(one(*w) for w in work))
        finally:
            await ae.shutdown()

    got = asyncio.run(main())
    for (name, ids, _), tokens in zip(work, got):
        assert tokens == peft_greedy(name, ids, N_NEW), name
    assert engine.adapters.tier_counts()["disk"] > 0  # the host tier really was too small for all of them
    assert engine.blocks.allocator.num_used == 0 and all(e.refs == 0 and e.pins == 0
                                                          for e in engine.adapters.entries.values())
