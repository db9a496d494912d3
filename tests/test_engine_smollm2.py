"""The engine on the real SmolLM2 against transformers' generate (the oracle), greedy, fp32."""
from __future__ import annotations

import pytest
import torch

from server.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.request import FinishReason, GenerateRequest, SamplingParams
from tests import smollm2
from tests.oracle import hf_greedy, hf_smollm2

pytestmark = pytest.mark.slow  # the real SmolLM2 and its oracles: minutes, not seconds

LONG = ("The history of the lighthouse begins with fires lit on hilltops to guide ships home. " * 40).strip()
RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "Q: What is 17 + 25?\nA:",
    LONG + " Summarize the text above in one sentence:",
]
CHAT_PROMPTS = [
    [{"role": "user", "content": "Write a haiku about autumn."}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "How are you today?"}],
    [{"role": "user", "content": "List three primary colors."}],
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def engine():
    return smollm2.engine(EngineConfig(kv_cache_memory=64 << 20, max_num_batched_tokens=256))


@pytest.fixture(scope="module")
def hf():
    return hf_smollm2()


def _requests(engine):
    reqs = [GenerateRequest(prompt=p, sampling=SamplingParams(max_new_tokens=NEW_TOKENS)) for p in RAW_PROMPTS]
    reqs += [GenerateRequest(messages=m, sampling=SamplingParams(max_new_tokens=NEW_TOKENS)) for m in CHAT_PROMPTS]
    return reqs


def run_staggered(engine: LLMEngine, requests: list[GenerateRequest], every: int = 2,
                  max_steps: int = 10_000) -> dict[str, list]:
    """Add one request every `every` steps; -> request_id -> [token ids, text, finish reason]."""
    results: dict[str, list] = {}
    pending = list(requests)
    seqs = []
    for step in range(max_steps):
        if pending and step % every == 0:
            seq = engine.make_sequence(pending.pop(0))
            engine.add(seq)
            seqs.append(seq)
            results[seq.request_id] = [[], "", None]
        for out in engine.step():
            r = results[out.request_id]
            r[0] += out.token_ids
            r[1] += out.text
            if out.finished:
                r[2] = out.finish_reason
        if not pending and not engine.has_work():
            break
    return {s.request_id: results[s.request_id] + [s] for s in seqs}


def test_staggered_batch_matches_transformers_generate(engine, hf):
    reqs = _requests(engine)
    results = run_staggered(engine, reqs)
    assert any(len(r[3].prompt_ids) > 512 for r in results.values()), "one prompt must exceed 512 tokens"
    for ids, text, reason, seq in results.values():
        ref = hf_greedy(hf, seq.prompt_ids, NEW_TOKENS)
        assert ids == ref, f"prompt {engine.tokenizer.decode(seq.prompt_ids)[:60]!r}"
        assert reason in (FinishReason.LENGTH, FinishReason.EOS)
        assert text == engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert engine.blocks.allocator.num_used == 0


def test_preemption_under_tiny_kv_budget_keeps_outputs(hf):
    # 14 blocks of 16 tokens = 224 cache tokens for 6 requests of ~20-40 tokens + 40 new each.
    cfg = EngineConfig(kv_cache_memory=14 * 16 * 30 * 2 * 3 * 64 * 4, max_num_batched_tokens=64)
    eng = smollm2.engine(cfg)
    assert eng.blocks.allocator.num_blocks == 14
    reqs = [GenerateRequest(prompt=p, sampling=SamplingParams(max_new_tokens=40, ignore_eos=True))
            for p in RAW_PROMPTS[:4] + ["Tell me about the moon.", "Water boils at"]]
    results = run_staggered(eng, reqs, every=1)
    assert eng.scheduler.num_preemptions > 0
    for ids, _, reason, seq in results.values():
        assert reason is FinishReason.LENGTH and len(ids) == 40
        assert ids == _hf_ignore_eos(hf, seq.prompt_ids, 40)
    assert eng.blocks.allocator.num_used == 0


def _hf_ignore_eos(hf, prompt_ids, n):
    """transformers' greedy continuation for n tokens, straight through EOS (generate() would stop or
    suppress it): the model's own forward with its own KV cache."""
    ids, out, past = torch.tensor([prompt_ids]), [], None
    with torch.no_grad():
        for _ in range(n):
            res = hf(input_ids=ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            ids = res.logits[:, -1:].argmax(-1)
            out.append(int(ids))
    return out


def test_abort_frees_every_block(engine):
    seqs = [engine.make_sequence(GenerateRequest(prompt=p, sampling=SamplingParams(max_new_tokens=50)))
            for p in RAW_PROMPTS]
    for s in seqs:
        engine.add(s)
    for _ in range(6):
        engine.step()
    assert engine.blocks.allocator.num_used > 0
    outs = [engine.abort(s.request_id) for s in seqs]
    assert all(o.finish_reason is FinishReason.CANCELLED for o in outs)
    assert engine.blocks.allocator.num_used == 0 and not engine.has_work()
    assert engine.abort(seqs[0].request_id) is None


def test_seeded_sampling_independent_of_batch(engine):
    params = SamplingParams(max_new_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = run_staggered(engine, [GenerateRequest(prompt="My favourite animal is", sampling=params)])
    others = [GenerateRequest(prompt=p, sampling=SamplingParams(max_new_tokens=15, temperature=1.0))
              for p in RAW_PROMPTS[:4]]
    mixed = run_staggered(engine, others[:2] + [GenerateRequest(prompt="My favourite animal is", sampling=params)]
                          + others[2:], every=1)
    (a,) = [r[0] for r in alone.values()]
    seeded = [r[0] for r in mixed.values() if r[3].params.seed == 1234]
    assert seeded == [a]
    other_seed = run_staggered(engine, [GenerateRequest(prompt="My favourite animal is",
                                                        sampling=SamplingParams(**{**params.__dict__, "seed": 99}))])
    assert [r[0] for r in other_seed.values()] != [a]


def test_stop_string_cuts_text(engine, hf):
    prompt = "Count: 1, 2, 3, 4, 5,"
    ref_ids = hf_greedy(hf, engine.tokenizer(prompt).input_ids, 20)
    ref_text = engine.tokenizer.decode(ref_ids, skip_special_tokens=True)
    stop = ref_text[5:8]  # a stop string somewhere inside the reference continuation
    (res,) = run_staggered(engine, [GenerateRequest(prompt=prompt, sampling=SamplingParams(
        max_new_tokens=20, stop=(stop,)))]).values()
    ids, text, reason, _ = res
    assert reason is FinishReason.STOP
    assert text == ref_text[:ref_text.index(stop)]
    assert stop not in text


def test_request_validation(engine):
    from server.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="exceeds the context"):
        engine.make_sequence(GenerateRequest(prompt="hi", sampling=SamplingParams(max_new_tokens=10**6)))
    with pytest.raises(InvalidRequestError, match="out of range"):
        engine.make_sequence(GenerateRequest(prompt_token_ids=[1, 10**7]))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
