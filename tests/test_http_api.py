"""The OpenAI-compatible HTTP API end to end: the real server process, the real `openai` SDK (and httpx for
raw bodies and disconnects), greedy tokens equal to gRPC's and PEFT's, every sampling option in one batch."""
from __future__ import annotations

import json
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx2 as httpx  # the HTTP client the openai SDK itself uses
import openai
import pytest
import torch

from proto import tessera_pb2 as pb
from tests.peft_adapters import build, peft_greedy
from tests.server_proc import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEY, ADMIN = "client-key", "admin-token"
BASE = "SmolLM2-135M-Instruct"
PROMPT = "The three most important things about"
N = 12
TEMPLATE = "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}### assistant:\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-root")
    for name in ("r4-qv", "dora-r8"):
        shutil.copytree(build(name), root / name)
    shutil.copytree(build("r4-qv"), root / "templated")
    (root / "templated" / "chat_template.jinja").write_text(TEMPLATE)
    srv = ServerProcess(tmp_path_factory.mktemp("srv"), "--adapter-root", str(root), "--admin-token", ADMIN,
                        "--api-key", KEY, "--max-message-bytes", "256KiB")
    srv.root = root
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from tests.oracle import hf_smollm2_dir
    return AutoTokenizer.from_pretrained(hf_smollm2_dir())


def http(server, method, path, body=None, token=KEY, **kw):
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, f"{server.base_url}{path}", json=body, headers=headers, timeout=120, **kw)


def grpc_tokens(server, adapter, prompt=PROMPT, n=N):
    msgs = list(server.stub.Generate(pb.GenerateRequest(prompt=prompt, adapter_id=adapter or "", max_new_tokens=n),
                                     metadata=[("authorization", f"Bearer {KEY}")]))
    return [t for m in msgs for t in m.token_ids]


def extra(obj, name):
    return (obj.model_extra or {})[name]


def test_completions_equal_grpc_and_peft(server, client, tok):
    ids = tuple(tok(PROMPT).input_ids)
    for model, adapter in ((BASE, None), ("r4-qv", "r4-qv"), ("dora-r8", "dora-r8")):  # adapters load on demand
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0,
                                      extra_body={"return_token_ids": True})
        got = extra(r.choices[0], "token_ids")
        assert got == peft_greedy(adapter, ids, N) == grpc_tokens(server, adapter), model
        assert r.choices[0].text == tok.decode(got) and r.choices[0].finish_reason == "length"
        assert r.model == model and r.object == "text_completion" and r.id.startswith("cmpl-") and r.created > 0
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), N, len(ids) + N)
    # a token-id prompt is the same request
    r = client.completions.create(model="r4-qv", prompt=list(ids), max_tokens=N, temperature=0)
    assert r.choices[0].text == tok.decode(peft_greedy("r4-qv", ids, N))


def test_streaming_equals_non_streaming_and_usage_chunk(client):
    full = client.completions.create(model="r4-qv", prompt=PROMPT, max_tokens=N, temperature=0)
    chunks = list(client.completions.create(model="r4-qv", prompt=PROMPT, max_tokens=N, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    *body, last = chunks
    assert "".join(c.choices[0].text for c in body) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in body][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in body[:-1]) and all(c.usage is None for c in body)
    assert last.choices == [] and last.usage.completion_tokens == N
    assert last.usage.prompt_tokens == full.usage.prompt_tokens
    # without include_usage: no usage chunk
    plain = list(client.completions.create(model="r4-qv", prompt=PROMPT, max_tokens=3, temperature=0, stream=True))
    assert all(c.choices for c in plain) and all(c.usage is None for c in plain)


def test_chat_with_an_adapter_equals_peft_streaming_or_not(client, tok):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fruit."}]
    ids = tuple(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    r = client.chat.completions.create(model="dora-r8", messages=messages, max_completion_tokens=N, temperature=0,
                                       extra_body={"return_token_ids": True})
    want = peft_greedy("dora-r8", ids, N)
    got = extra(r.choices[0], "token_ids")
    assert got == want[:len(got)] and (len(got) == N or want[len(got)] == 2)  # 2 = <|im_end|>: stop
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(got)
    stream = list(client.chat.completions.create(model="dora-r8", messages=messages, max_tokens=N, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant" and stream[0].object == "chat.completion.chunk"
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == r.choices[0].message.content
    assert stream[-1].usage.completion_tokens == r.usage.completion_tokens


def test_an_adapter_with_its_own_chat_template(server, client, tok):
    messages = [{"role": "user", "content": "Hello"}]
    r = client.chat.completions.create(model="templated", messages=messages, max_tokens=2, temperature=0)
    rendered = tok.apply_chat_template(messages, chat_template=TEMPLATE, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("### user:\nHello\n### assistant:")
    assert r.usage.prompt_tokens == len(tok(rendered, add_special_tokens=False).input_ids)
    base = client.chat.completions.create(model=BASE, messages=messages, max_tokens=2, temperature=0)
    assert base.usage.prompt_tokens == len(tok.apply_chat_template(messages, add_generation_prompt=True,
                                                                   tokenize=True, return_dict=False))
    # gRPC chat requests for that adapter use it too
    msgs = list(server.stub.Generate(pb.GenerateRequest(messages=[pb.Message(role="user", content="Hello")],
                                                        adapter_id="templated", max_new_tokens=2),
                                     metadata=[("authorization", f"Bearer {KEY}")]))
    assert msgs[-1].prompt_tokens == r.usage.prompt_tokens


def test_models_and_the_admin_endpoints(server, client, tmp_path):
    outside = tmp_path / "mine"
    shutil.copytree(build("r4-qv"), outside)
    body = {"lora_name": "custom/one", "lora_path": str(outside)}
    assert http(server, "POST", "/v1/load_lora_adapter", body, token=None).status_code == 401
    r = http(server, "POST", "/v1/load_lora_adapter", body, token=KEY)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    r = http(server, "POST", "/v1/load_lora_adapter", body, token=ADMIN)
    assert r.status_code == 200, r.text
    r = http(server, "POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path / "no")},
             token=ADMIN)
    assert r.status_code == 404 and r.json()["error"]["param"] == "lora_path"
    client.completions.create(model="r4-qv", prompt="hi", max_tokens=1)  # loaded on demand (maybe already)
    models = {m.id: m for m in client.models.list().data}
    assert models[BASE].object == "model" and extra(models[BASE], "parent") is None
    assert extra(models[BASE], "max_model_len") == 8192
    mine = models["custom/one"]
    assert extra(mine, "parent") == BASE and extra(mine, "root") == str(outside) and mine.owned_by == "tessera"
    assert extra(models["r4-qv"], "root") == str(server.root / "r4-qv")
    r = client.completions.create(model="custom/one", prompt=PROMPT, max_tokens=N, temperature=0)
    assert r.choices[0].text == client.completions.create(model="r4-qv", prompt=PROMPT, max_tokens=N,
                                                          temperature=0).choices[0].text
    assert http(server, "POST", "/v1/unload_lora_adapter", {"lora_name": "custom/one"}, token=KEY).status_code == 403
    assert http(server, "POST", "/v1/unload_lora_adapter", {"lora_name": "custom/one"}, token=ADMIN).status_code == 200
    assert "custom/one" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError) as err:  # not under the adapter root: gone for good
        client.completions.create(model="custom/one", prompt="hi", max_tokens=1)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    r = http(server, "POST", "/v1/unload_lora_adapter", {"lora_name": "custom/one"}, token=ADMIN)
    assert r.status_code == 404 and r.json()["error"]["param"] == "lora_name"


def test_mixed_base_and_adapter_streams_in_one_batch(client, tok):
    ids = tuple(tok(PROMPT).input_ids)
    models = [BASE, "r4-qv", "dora-r8", BASE, "r4-qv", "dora-r8"]
    barrier = threading.Barrier(len(models))

    def one(model):
        barrier.wait()
        text, toks = "", []
        for c in client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0, stream=True,
                                           extra_body={"return_token_ids": True}):
            text += c.choices[0].text
            toks += extra(c.choices[0], "token_ids")
        return text, toks

    with ThreadPoolExecutor(len(models)) as ex:
        results = list(ex.map(one, models))
    for model, (text, toks) in zip(models, results):
        want = peft_greedy(None if model == BASE else model, ids, N)
        assert toks == want and text == tok.decode(want), model


def _gauges(server):
    m = server.metrics()
    return m["vllm:kv_cache_usage_perc"], m["vllm:num_requests_running"], m.get(
        'tessera_requests_total{finish_reason="cancelled"}', 0)


def _wait_idle(server, timeout=10.0):
    deadline = time.monotonic() + timeout
    while (g := _gauges(server))[:2] != (0, 0):
        assert time.monotonic() < deadline, g
        time.sleep(0.05)
    return g


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_kv_blocks(server, stream):
    cancelled = _wait_idle(server)[2]
    body = {"model": "r4-qv", "prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True, "stream": stream}
    with httpx.Client(timeout=60) as c:
        if stream:
            with c.stream("POST", f"{server.base_url}/v1/completions", json=body,
                          headers={"authorization": f"Bearer {KEY}"}) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                kv, running, _ = _gauges(server)
                assert kv > 0 and running == 1
        else:
            with pytest.raises(httpx.ReadTimeout):
                c.post(f"{server.base_url}/v1/completions", json=body, headers={"authorization": f"Bearer {KEY}"},
                       timeout=1.5)
    kv, running, now_cancelled = _wait_idle(server)
    assert now_cancelled == cancelled + 1


BAD = [  # body, status, param (None: no param expected), words in the message
    ({"prompt": "x", "temperature": -1}, 400, "temperature", "greater than or equal"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p", "greater than"),
    ({"prompt": "x", "n": 17}, 400, "n", "less than"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "greater than"),
    ({"prompt": "x", "max_tokens": 9000}, 400, None, "exceeds the context"),
    ({"prompt": "x", "min_tokens": 9, "max_tokens": 3}, 400, "min_tokens", "must not exceed"),
    ({"prompt": "x", "logit_bias": {"1": 2}}, 400, "logit_bias", "not supported"),
    ({"prompt": "x", "suffix": "y"}, 400, "suffix", "not supported"),
    ({"prompt": "x", "best_of": 3}, 400, "best_of", "not supported"),
    ({"prompt": "x", "echo": True, "logprobs": 1}, 400, "echo", "not supported"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", "stream: true"),
    ({"prompt": "x", "stop": ["a"] * 17}, 400, "stop", "at most 16"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs", "less than"),
    ({"prompt": ""}, 400, "prompt", "empty"),
    ({"prompt": []}, 400, "prompt", "empty"),
    ({"prompt": [-1]}, 400, "prompt", ">= 0"),
    ({"prompt": [10**9]}, 400, None, "out of range"),
    ({"prompt": "x", "stop_token_ids": [10**9]}, 400, None, "below the vocabulary size"),
    ({"max_tokens": 3}, 400, "prompt", "Field required"),
    ({"prompt": "x", "model": "no/such/adapter"}, 404, "model", "neither loaded"),
    ({"prompt": "x", "model": "../escape"}, 400, "model", "relative name"),
    ({"prompt": "x" * 300_000}, 413, None, "over 262144 bytes"),
]


@pytest.mark.parametrize("body,status,param,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_completions_get_openai_errors(server, body, status, param, words):
    r = http(server, "POST", "/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and words in err["message"], err
    if param is not None:
        assert err["param"] == param


CHAT_BAD = [
    ({"messages": []}, 400, "messages", "at least 1"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content[0]", "text"),
    ({"messages": [{"content": "x"}]}, 400, "messages.0.role", "Field required"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs", "needs logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 21, "logprobs": True}, 400, "top_logprobs",
     "less than"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema",
                                                                           "json_schema": {"name": "p"}}},
     400, "response_format.json_schema", "needs json_schema.schema"),
    ({"messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "wrong"}}}},
     400, "response_format.json_schema.schema", "wrong"),
    ({"messages": [{"role": "user", "content": "x"}], "structured_outputs": {"regex": "(x"}}, 400,
     "structured_outputs.regex", "parenthesis"),
    ({"messages": [{"role": "user", "content": "x"}], "structured_outputs": {"choice": []}}, 400,
     "structured_outputs.choice", "non-empty strings"),
    ({"messages": [{"role": "user", "content": "x"}], "structured_outputs": {"grammar": "root ::= nope"}}, 400,
     "structured_outputs.grammar", "nope"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"},
      "structured_outputs": {"regex": "a"}}, 400, "structured_outputs.regex", "give one output constraint"),
    ({"messages": [{"role": "user", "content": "x"}], "guided_json": "{not json"}, 400, "guided_json",
     "not valid JSON"),
]


@pytest.mark.parametrize("body,status,param,words", CHAT_BAD, ids=[str(i) for i in range(len(CHAT_BAD))])
def test_bad_chat_requests_get_openai_errors(server, body, status, param, words):
    r = http(server, "POST", "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["param"] == param, err


def test_auth_malformed_bodies_and_other_routes(server):
    assert http(server, "POST", "/v1/completions", {"prompt": "x"}, token=None).status_code == 401
    r = http(server, "POST", "/v1/completions", {"prompt": "x"}, token="wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert http(server, "GET", "/v1/models", token=None).status_code == 401
    r = httpx.post(f"{server.base_url}/v1/completions", content=b"{not json", timeout=10,
                   headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{server.base_url}/v1/completions", content=b"\xff\xfe", timeout=10,
                   headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 400
    assert http(server, "GET", "/v1/nothing").status_code == 404
    assert http(server, "GET", "/v1/completions").status_code == 405
    # no credentials needed: the probes and scrapers of a gateway
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert httpx.get(f"{server.base_url}/version").json()["version"]
    metrics = httpx.get(f"{server.base_url}/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:gpu_cache_usage_perc", "vllm:lora_requests_info{"):
        assert f"\n{name}" in metrics, name
    spec = httpx.get(f"{server.base_url}/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/load_lora_adapter"} <= set(spec["paths"])


# -- every sampling option, inside the real engine, in one batch ---------------------------------------
OPTIONS = [
    {"temperature": 0},
    {"temperature": 0.9, "seed": 7},
    {"temperature": 1.2, "top_p": 0.8, "seed": 8},
    {"temperature": 0.7, "top_k": 5, "seed": 9},
    {"temperature": 0, "repetition_penalty": 1.3},
    {"temperature": 0, "presence_penalty": 1.5, "frequency_penalty": 0.5},
    {"temperature": 0.8, "frequency_penalty": -1.0, "seed": 10},
    {"temperature": 0, "stop": [" the", "\n"]},
    {"temperature": 0, "stop_token_ids": [279]},
    {"temperature": 0, "logprobs": 3},
    {"temperature": 0, "ignore_eos": True, "min_tokens": 10},
    {"temperature": 0.5, "n": 2, "seed": 11},
    {"temperature": 0, "echo": True, "user": "tenant-7"},
    {"temperature": 1e-30, "top_k": -1},
]


def _completion(server, opts, model="r4-qv", prompt=PROMPT):
    r = http(server, "POST", "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": N,
                                                 "return_token_ids": True, **opts})
    assert r.status_code == 200, (opts, r.text)
    return r.json()


def test_every_sampling_option_in_one_batch_equals_alone(server):
    alone = [_completion(server, o) for o in OPTIONS]
    barrier = threading.Barrier(len(OPTIONS))

    def together(o):
        barrier.wait()
        return _completion(server, o)

    with ThreadPoolExecutor(len(OPTIONS)) as ex:
        batched = list(ex.map(together, OPTIONS))
    for o, a, b in zip(OPTIONS, alone, batched):
        assert [c["token_ids"] for c in a["choices"]] == [c["token_ids"] for c in b["choices"]], o
        assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]], o
    by = {json.dumps(o, sort_keys=True): r for o, r in zip(OPTIONS, batched)}
    get = lambda o: by[json.dumps(o, sort_keys=True)]  # noqa: E731
    greedy = get({"temperature": 0})["choices"][0]
    assert get({"temperature": 1e-30, "top_k": -1})["choices"][0]["token_ids"] == greedy["token_ids"]
    stopped = get({"temperature": 0, "stop": [" the", "\n"]})["choices"][0]
    assert stopped["finish_reason"] == "stop" and " the" not in stopped["text"] and "\n" not in stopped["text"]
    assert greedy["text"].startswith(stopped["text"])
    two = get({"temperature": 0.5, "n": 2, "seed": 11})["choices"]
    assert [c["index"] for c in two] == [0, 1] and two[0]["token_ids"] != two[1]["token_ids"]
    echoed = get({"temperature": 0, "echo": True, "user": "tenant-7"})["choices"][0]
    assert echoed["text"] == PROMPT + greedy["text"]
    lp = get({"temperature": 0, "logprobs": 3})["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == N
    assert "".join(lp["tokens"]) == greedy["text"] and lp["text_offset"][0] == 0
    for sampled, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 3 and max(top.values()) == pytest.approx(sampled)  # greedy: the best one
    assert get({"temperature": 0, "ignore_eos": True, "min_tokens": 10})["usage"]["completion_tokens"] == N


class _OpenAIPenalties:
    """The reference for presence/frequency penalties over generated tokens (OpenAI's definition)."""

    def __init__(self, n_prompt, presence, frequency):
        self.n_prompt, self.presence, self.frequency = n_prompt, presence, frequency

    def __call__(self, input_ids, scores):
        out = input_ids[0, self.n_prompt:]
        if len(out):
            ids, counts = torch.unique(out, return_counts=True)
            scores = scores.clone()
            scores[0, ids] -= self.frequency * counts.float() + self.presence
        return scores


def test_penalties_min_tokens_and_top_logprobs_equal_transformers(server, client, tok):
    from transformers import LogitsProcessorList

    from tests.oracle import hf_smollm2
    model = hf_smollm2()
    ids = tok(PROMPT, return_tensors="pt").input_ids

    def hf(**kw):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, do_sample=False,
                                 pad_token_id=2, return_dict_in_generate=True, output_scores=True, **kw)
        return out.sequences[0, ids.shape[1]:].tolist(), out.scores

    want, _ = hf(logits_processor=LogitsProcessorList([_OpenAIPenalties(ids.shape[1], 1.5, 0.7)]))
    r = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=N, temperature=0, presence_penalty=1.5,
                                  frequency_penalty=0.7, extra_body={"return_token_ids": True})
    assert extra(r.choices[0], "token_ids") == want
    # min_tokens: a chat turn the model ends early runs on to min_tokens (EOS cannot be sampled before)
    messages = [{"role": "user", "content": "Reply with one word: yes or no?"}]
    chat_ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    free = client.chat.completions.create(model=BASE, messages=messages, max_tokens=30, temperature=0)
    assert free.choices[0].finish_reason == "stop" and free.usage.completion_tokens == 3  # "Yes." + <|im_end|>
    forced = client.chat.completions.create(model=BASE, messages=messages, max_tokens=30, temperature=0,
                                            extra_body={"min_tokens": 12, "return_token_ids": True})
    assert forced.usage.completion_tokens >= 12
    with torch.no_grad():
        hf_forced = model.generate(chat_ids["input_ids"], attention_mask=chat_ids["attention_mask"],
                                   max_new_tokens=30, min_new_tokens=12, do_sample=False, pad_token_id=2)
    hf_forced = hf_forced[0, chat_ids["input_ids"].shape[1]:].tolist()
    got = extra(forced.choices[0], "token_ids")
    assert got == hf_forced[:len(got)]
    # top_logprobs: the 5 most likely tokens at each greedy step, as transformers computes them
    want, scores = hf()
    r = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": PROMPT}], max_tokens=1,
                                       temperature=0)  # warm the chat path; the check below uses completions
    r = http(server, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": N, "temperature": 0,
                                                 "logprobs": 5, "return_token_ids": True}).json()
    choice = r["choices"][0]
    assert choice["token_ids"] == want
    for step, (top, sampled) in enumerate(zip(choice["logprobs"]["top_logprobs"], choice["logprobs"]["token_logprobs"])):
        ref = scores[step][0].log_softmax(-1)
        vals, best = ref.topk(5)
        assert sampled == pytest.approx(float(ref[want[step]]), abs=2e-3)
        ours = sorted(top.values(), reverse=True)
        assert ours == pytest.approx(vals.tolist(), abs=2e-3), step
        assert set(top) <= {tok.decode([t]) for t in best.tolist()} | {tok.decode([t]) for t in ref.topk(8)[1].tolist()}


def test_chat_logprobs_shape(client):
    r = client.chat.completions.create(model="r4-qv", messages=[{"role": "user", "content": "Count to three"}],
                                       max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob)
        assert bytes(c.bytes).decode() == c.token


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                            "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def test_structured_output_with_the_openai_sdk_and_grpc(server, client):
    """response_format json_schema / json_object and vLLM's structured_outputs (regex, choice) through the real
    SDK, streaming or not, base and adapter; the same constraint over gRPC; a length cut says length."""
    import jsonschema

    msgs = [{"role": "user", "content": "Describe a person as JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for model in (BASE, "r4-qv"):
        r = client.chat.completions.create(model=model, messages=msgs, max_tokens=60, temperature=0,
                                           response_format=fmt)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
        streamed = client.chat.completions.create(model=model, messages=msgs, max_tokens=60, temperature=0,
                                                  response_format=fmt, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == r.choices[0].message.content
    r = client.chat.completions.create(model=BASE, messages=msgs, max_tokens=80, temperature=0.7, seed=5, n=2,
                                       response_format={"type": "json_object"})
    done = [c for c in r.choices if c.finish_reason == "stop"]  # any other was cut by max_tokens: says length
    assert done and all(c.finish_reason == "length" for c in r.choices if c not in done)
    assert all(isinstance(json.loads(c.message.content), dict) for c in done)
    r = client.completions.create(model="dora-r8", prompt="The year is", max_tokens=8, temperature=0,
                                  extra_body={"structured_outputs": {"regex": "[12][0-9]{3}"}})
    assert re.fullmatch("[12][0-9]{3}", r.choices[0].text) and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=BASE, prompt="Pick one:", max_tokens=8, temperature=0,
                                  extra_body={"structured_outputs": {"choice": ["left", "right"]}})
    assert r.choices[0].text in ("left", "right")
    r = client.chat.completions.create(model=BASE, messages=msgs, max_tokens=3, temperature=0, response_format=fmt)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    meta = [("authorization", f"Bearer {KEY}")]
    req = pb.GenerateRequest(prompt="Describe a person as JSON:", max_new_tokens=60,
                             structured_output=pb.StructuredOutput(json_schema=json.dumps(PERSON)))
    out = list(server.stub.Generate(req, metadata=meta))
    assert out[-1].finish_reason == pb.EOS
    jsonschema.validate(json.loads("".join(m.text for m in out)), PERSON)
    req = pb.GenerateRequest(prompt="x", structured_output=pb.StructuredOutput(
        choice=pb.ChoiceList(choices=["a", "b"])))
    assert "".join(m.text for m in server.stub.Generate(req, metadata=meta)) in ("a", "b")
    for bad, words in ((pb.StructuredOutput(regex="(x"), "structured_output.regex"),
                       (pb.StructuredOutput(json_schema='{"type": 5}'), "structured_output.json_schema"),
                       (pb.StructuredOutput(), "set one of json_schema")):
        with pytest.raises(grpc.RpcError) as err:
            list(server.stub.Generate(pb.GenerateRequest(prompt="x", structured_output=bad), metadata=meta))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()


def test_http_and_grpc_share_one_engine_and_its_metrics(server, client):
    before = server.metrics()
    client.completions.create(model=BASE, prompt="Hello", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    with pytest.raises(grpc.RpcError):
        list(server.stub.Generate(pb.GenerateRequest(prompt="Hello", max_new_tokens=4)))  # no api key
    r = http(server, "POST", "/v1/completions", {"prompt": "x", "temperature": -1})
    assert r.status_code == 400
    after = server.metrics()
    assert after['tessera_requests_total{finish_reason="length"}'] >= before.get(
        'tessera_requests_total{finish_reason="length"}', 0) + 1
    assert after["tessera_generation_tokens_total"] >= before["tessera_generation_tokens_total"] + 4
    assert after['tessera_requests_rejected_total{code="INVALID_ARGUMENT"}'] >= before.get(
        'tessera_requests_rejected_total{code="INVALID_ARGUMENT"}', 0) + 1
    assert after['tessera_requests_rejected_total{code="UNAUTHENTICATED"}'] >= before.get(
        'tessera_requests_rejected_total{code="UNAUTHENTICATED"}', 0) + 1


def test_a_shared_system_prompt_is_reused_per_adapter_and_outputs_stay_peft_exact(server, client, tok):
    """Prefix caching end to end: the second request of each model starts on the first one's cached blocks
    (the counters say so), never on another model's, and its greedy tokens are still PEFT's."""
    system = "You answer questions about the following story. " + " ".join(f"Line {i}: the fox ran." for i in range(30))
    shared = len(tok(system).input_ids) // 16 * 16  # full blocks of the shared part (block size 16)
    for model, adapter in ((BASE, None), ("r4-qv", "r4-qv")):
        hits = []
        for q in ("Who ran?", "What did the fox do?"):
            prompt = f"{system}\nQ: {q}\nA:"
            before = server.metrics()
            r = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0,
                                          extra_body={"return_token_ids": True})
            after = server.metrics()
            hits.append(after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"])
            assert after["vllm:prefix_cache_queries_total"] > before["vllm:prefix_cache_queries_total"]
            assert extra(r.choices[0], "token_ids") == peft_greedy(adapter, tuple(tok(prompt).input_ids), 6), (model, q)
        assert hits[0] < shared <= hits[1], (model, hits)  # the first of each model found none of the other's
    m = server.metrics()
    assert 0 < m["tessera_prefix_cache_hit_rate"] < 1 and m["tessera_kv_cache_blocks_cached"] > 0
