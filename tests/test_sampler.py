"""Sampler against transformers' logits processors; seeded draws independent of the batch."""
import re

import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from server.engine.request import SamplingParams
from server.engine.sampler import (Sampler, SamplingState, apply_repetition_penalty, apply_temperature,
                                   top_k_top_p_filter)

V = 257


def _hf_process(logits, ids, p: SamplingParams):
    x = logits.clone().unsqueeze(0)
    inp = torch.tensor([ids])
    if p.repetition_penalty != 1.0:
        x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(inp, x)
    if p.temperature not in (0.0, 1.0):
        x = TemperatureLogitsWarper(p.temperature)(inp, x)
    if p.top_k:
        x = TopKLogitsWarper(p.top_k)(inp, x)
    if p.top_p < 1.0:
        x = TopPLogitsWarper(p.top_p)(inp, x)
    return x[0]


@pytest.mark.parametrize("penalty,temp,top_k,top_p", [
    (1.0, 1.0, 0, 1.0), (1.3, 0.7, 0, 1.0), (1.0, 1.0, 20, 1.0), (1.0, 0.8, 0, 0.9), (1.2, 1.5, 50, 0.5),
    (0.8, 1.0, 1, 1.0), (1.0, 1.0, 0, 0.01)])
def test_filters_match_transformers(penalty, temp, top_k, top_p):
    g = torch.Generator().manual_seed(hash((penalty, temp, top_k, top_p)) % 2**31)
    logits = torch.randn(V, generator=g) * 3
    ids = torch.randint(0, V, (40,), generator=g).tolist()
    p = SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    ours = apply_repetition_penalty(logits, ids, penalty)
    ours = top_k_top_p_filter(apply_temperature(ours, temp), top_k, top_p)
    ref = ref_shifted = _hf_process(logits, ids, p)
    if temp != 1.0:  # ours is shifted by the row maximum before dividing: the same distribution
        ref_shifted = ref - ref.max()
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = ~torch.isinf(ref)
    torch.testing.assert_close(ours[finite], ref_shifted[finite], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.softmax(-1), ref.softmax(-1))
    assert finite.sum() >= 1


def test_greedy_is_argmax_after_penalty_and_logprobs():
    logits = torch.randn(4, V)
    logits[0, 7] = 50.0  # would win, but is penalised below another token
    logits[0, 9] = 45.0
    states = [SamplingState.create(SamplingParams(repetition_penalty=2.0, logprobs=True), torch.device("cpu"))]
    states += [SamplingState.create(SamplingParams(), torch.device("cpu")) for _ in range(3)]
    out = Sampler()(logits.clone(), states, [[7], [], [1, 2], []])
    ids, lps = out.token_ids, out.logprobs
    assert out.errors == {}
    assert ids[0] == 9
    assert ids[1:].tolist() == logits[1:].argmax(-1).tolist()
    penalised = logits.clone()
    penalised[0, 7] /= 2.0
    want = penalised.log_softmax(-1)[torch.arange(4), ids]
    torch.testing.assert_close(lps, want)


def test_seeded_sampling_is_independent_of_batch_composition():
    torch.manual_seed(0)
    steps = [torch.randn(8, V) for _ in range(12)]
    p = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=1234)

    def run(rows, include_others):
        states = [SamplingState.create(p, torch.device("cpu"))]
        others = [SamplingState.create(SamplingParams(temperature=1.0, seed=i), torch.device("cpu"))
                  for i in range(rows - 1)] if include_others else []
        out = []
        for s in steps:
            batch = s[:1 + len(others)] if include_others else s[:1]
            ids = Sampler()(batch.clone(), states + others, [[]] * (1 + len(others))).token_ids
            out.append(int(ids[0]))
        return out

    alone = run(1, False)
    assert alone == run(8, True) == run(3, True)
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=99)
    st = SamplingState.create(other_seed, torch.device("cpu"))
    differs = [int(Sampler()(s[:1].clone(), [st], [[]]).token_ids[0]) for s in steps]
    assert differs != alone


def test_sampled_distribution_follows_probabilities():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2] + [1e-9] * 5]))
    st = SamplingState.create(SamplingParams(temperature=1.0, seed=5), torch.device("cpu"))
    counts = torch.zeros(8)
    for _ in range(3000):
        counts[Sampler()(logits.clone(), [st], [[]]).token_ids[0]] += 1
    freq = counts / counts.sum()
    assert abs(freq[0] - 0.5) < 0.04 and abs(freq[1] - 0.3) < 0.04 and abs(freq[2] - 0.2) < 0.04
    assert counts[3:].sum() == 0


def test_penalty_on_inference_tensors_and_tiny_temperatures():
    """Issue 16 items 1-2: logits made under inference_mode (as the model runner makes them) take a
    repetition penalty; temperature 1e-45 (a float32 denormal) samples the argmax, never nan."""
    with torch.inference_mode():
        logits = torch.randn(3, V) * 5
    states = [SamplingState.create(SamplingParams(repetition_penalty=1.1), torch.device("cpu")),
              SamplingState.create(SamplingParams(temperature=1e-45, seed=1, repetition_penalty=1.1, logprobs=True),
                                   torch.device("cpu")),
              SamplingState.create(SamplingParams(temperature=1e-45, seed=2, top_p=0.5, top_k=3), torch.device("cpu"))]
    out = Sampler()(logits, states, [[1, 2, 3], [4], []])
    assert out.errors == {}
    want = [apply_repetition_penalty(logits[0], [1, 2, 3], 1.1).argmax(), apply_repetition_penalty(
        logits[1], [4], 1.1).argmax(), logits[2].argmax()]
    assert out.token_ids.tolist() == [int(w) for w in want]
    assert torch.isfinite(out.logprobs).all() and out.logprobs[1] == 0.0


def test_a_non_finite_row_fails_alone():
    logits = torch.randn(4, V)
    logits[1, 5] = float("nan")
    logits[2, :] = float("-inf")
    states = [SamplingState.create(SamplingParams(temperature=t, seed=3), torch.device("cpu"))
              for t in (0.0, 0.8, 0.0, 0.7)]
    out = Sampler()(logits, states, [[], [], [], []])
    assert sorted(out.errors) == [1, 2] and "non-finite" in out.errors[1]
    assert int(out.token_ids[0]) == int(logits[0].argmax())
    assert 0 <= int(out.token_ids[3]) < V


def test_presence_frequency_penalties_min_tokens_bans_and_top_logprobs():
    """OpenAI's presence/frequency penalties over the generated tokens only, banned ids (min_tokens) never
    sampled, and the k best logprobs of each row — all in one batch with rows that ask for none of it."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(4, V, generator=g) * 2
    prompt, generated = [3, 3, 9], [5, 5, 5, 7]
    dev = torch.device("cpu")
    states = [SamplingState.create(SamplingParams(presence_penalty=0.5, frequency_penalty=1.5, logprobs=True,
                                                  top_logprobs=4), dev),
              SamplingState.create(SamplingParams(temperature=0.7, seed=1, presence_penalty=-2.0), dev),
              SamplingState.create(SamplingParams(min_tokens=3), dev),
              SamplingState.create(SamplingParams(logprobs=True), dev)]
    banned_id = int(logits[2].argmax())
    out = Sampler()(logits.clone(), states, [prompt + generated] * 4, [generated] * 4, [(), (), (banned_id, 2), ()])
    assert out.errors == {}
    ref = logits[0].clone()
    ref[5] -= 1.5 * 3 + 0.5
    ref[7] -= 1.5 * 1 + 0.5  # prompt tokens (3, 9) untouched
    assert int(out.token_ids[0]) == int(ref.argmax())
    top = ref.log_softmax(-1).topk(4)
    torch.testing.assert_close(out.top_logprobs[0], top.values)
    assert out.top_ids[0].tolist() == top.indices.tolist()
    assert float(out.logprobs[0]) == pytest.approx(float(top.values[0]))
    assert int(out.token_ids[2]) != banned_id and int(out.token_ids[2]) == int(
        logits[2].index_fill(0, torch.tensor([banned_id, 2]), float("-inf")).argmax())
    assert int(out.token_ids[3]) == int(logits[3].argmax())  # untouched row


def test_an_extreme_penalty_stays_finite():
    logits = torch.randn(2, V)
    logits[:, 4] = 30.0
    states = [SamplingState.create(SamplingParams(repetition_penalty=1e-38, logprobs=True,
                                                  top_logprobs=2), torch.device("cpu")),
              SamplingState.create(SamplingParams(temperature=0.5, seed=3, repetition_penalty=1e-38),
                                   torch.device("cpu"))]
    out = Sampler()(logits, states, [[4], [4]])
    assert out.errors == {} and int(out.token_ids[0]) == 4 and int(out.token_ids[1]) == 4
    assert torch.isfinite(out.logprobs).all()


def test_new_sampling_fields_are_validated():
    for kw, words in [({"top_logprobs": 3}, "needs logprobs"), ({"top_logprobs": 21, "logprobs": True}, "[0, 20]"),
                      ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": float("nan")}, "[-2, 2]"),
                      ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 9, "max_new_tokens": 8}, "must not exceed")]:
        with pytest.raises(ValueError, match=re.escape(words)):
            SamplingParams(**kw)
