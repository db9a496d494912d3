"""End to end: the real `python -m server` process on loopback ports, real gRPC clients, real /metrics."""
from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kernels import cpu_ext
from proto import tessera_pb2 as pb
from server.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.request import GenerateRequest, SamplingParams
from tests.server_proc import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ADMIN = "s3cret-admin"
PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time, in a small village,",
           "List three colors:"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("srv"), "--admin-token", ADMIN, "--max-queue", "4",
                        "--max-num-seqs", "4", "--max-message-bytes", "1MiB")
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def engine():
    return LLMEngine.from_config(EngineConfig())


def collect(stub, req, **kw):
    msgs = list(stub.Generate(req, **kw))
    return "".join(m.text for m in msgs), [t for m in msgs for t in m.token_ids], msgs


def engine_alone(engine, prompt, n):
    seq = engine.make_sequence(GenerateRequest(prompt=prompt, sampling=SamplingParams(max_new_tokens=n)))
    engine.add(seq)
    text, ids = "", []
    while engine.has_work():
        for o in engine.step():
            text += o.text
            ids += o.token_ids
    return text, ids


def test_concurrent_streams_equal_engine_alone(server, engine):
    reqs = [pb.GenerateRequest(prompt=p, max_new_tokens=24) for p in PROMPTS]
    with ThreadPoolExecutor(len(reqs)) as ex:
        results = list(ex.map(lambda r: collect(server.stub, r), reqs))
    for p, (text, ids, msgs) in zip(PROMPTS, results):
        assert (text, ids) == engine_alone(engine, p, 24)
        last = msgs[-1]
        assert last.finish_reason in (pb.LENGTH, pb.EOS)
        assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
        assert last.generated_tokens == len(ids) and last.prompt_tokens == len(engine.tokenizer(p).input_ids)
        assert 0 < last.time_to_first_token_s <= last.e2e_latency_s


def test_chat_messages_and_logprobs(server, engine):
    req = pb.GenerateRequest(messages=[pb.Message(role="user", content="Say hi")], max_new_tokens=8, logprobs=True)
    text, ids, msgs = collect(server.stub, req)
    want = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi"}], tokenize=False,
                                                add_generation_prompt=True)
    assert msgs[-1].prompt_tokens == len(engine.tokenizer(want, add_special_tokens=False).input_ids)
    lps = [lp for m in msgs for lp in m.logprobs]
    assert len(lps) == len(ids) and all(lp <= 0 for lp in lps)


def test_metrics_move_by_the_right_amounts(server):
    before = server.metrics()
    _, ids, msgs = collect(server.stub, pb.GenerateRequest(prompt="Count: one, two,", max_new_tokens=7,
                                                           ignore_eos=True))
    after = server.metrics()
    d = lambda k: after.get(k, 0.0) - before.get(k, 0.0)  # noqa: E731
    assert len(ids) == 7 and msgs[-1].finish_reason == pb.LENGTH
    assert d('tessera_requests_total{finish_reason="length"}') == 1
    assert d("tessera_prompt_tokens_total") == msgs[-1].prompt_tokens
    assert d("tessera_generation_tokens_total") == 7
    assert d("tessera_time_to_first_token_seconds_count") == 1
    assert d("tessera_inter_token_latency_seconds_count") == 6
    assert d("tessera_e2e_request_latency_seconds_count") == 1
    assert d("tessera_request_queue_time_seconds_count") == 1
    assert abs(d("tessera_e2e_request_latency_seconds_sum") - msgs[-1].e2e_latency_s) < 1e-3
    assert d('tessera_time_to_first_token_seconds_bucket{le="+Inf"}') == 1
    text = server.metrics_text()
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
        assert f"\n{name} " in text
    assert after["vllm:kv_cache_usage_perc"] == 0 and after["tessera_kv_cache_blocks_total"] > 0


def test_cancel_mid_stream_frees_blocks(server):
    call = server.stub.Generate(pb.GenerateRequest(prompt="Tell me a long story. " * 20, max_new_tokens=300,
                                                   ignore_eos=True))
    it = iter(call)
    for _ in range(3):
        next(it)
    m = server.metrics()
    assert m["tessera_kv_cache_blocks_used"] > 0 and m["vllm:kv_cache_usage_perc"] > 0
    assert m["vllm:num_requests_running"] == 1
    call.cancel()
    deadline = time.monotonic() + 10
    while server.metrics()["tessera_kv_cache_blocks_used"] > 0:
        assert time.monotonic() < deadline, "blocks of the cancelled stream were not freed"
        time.sleep(0.1)
    assert server.metrics()["vllm:num_requests_running"] == 0


def test_one_ms_deadline_fails_cleanly(server):
    with pytest.raises(grpc.RpcError) as err:
        collect(server.stub, pb.GenerateRequest(prompt="Slow down", max_new_tokens=50), timeout=0.001)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10
    while server.metrics()["tessera_kv_cache_blocks_used"] > 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    text, _, _ = collect(server.stub, pb.GenerateRequest(prompt="Still alive?", max_new_tokens=3))
    assert text


def test_flood_past_max_queue(server):
    n = 16
    start = threading.Barrier(n)

    def one(i):
        start.wait()
        try:
            _, ids, msgs = collect(server.stub, pb.GenerateRequest(prompt=f"Item {i}:", max_new_tokens=12,
                                                                   ignore_eos=True))
            return msgs[-1].finish_reason, len(ids)
        except grpc.RpcError as err:
            return err.code(), err.details()

    with ThreadPoolExecutor(n) as ex:
        results = list(ex.map(one, range(n)))
    refused = [r for r in results if r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
    done = [r for r in results if r[0] == pb.LENGTH]
    assert len(refused) + len(done) == n, results
    assert refused and "queue is full" in refused[0][1]
    assert len(done) >= 4 and all(k == 12 for _, k in done)
    assert server.metrics()['tessera_requests_rejected_total{code="RESOURCE_EXHAUSTED"}'] >= len(refused)


@pytest.mark.parametrize("req,code,words", [
    (pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "no input"),
    (pb.GenerateRequest(prompt="hi", temperature=-1), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (pb.GenerateRequest(prompt="hi", top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (pb.GenerateRequest(prompt="hi", max_new_tokens=10**6), grpc.StatusCode.INVALID_ARGUMENT, "context"),
    (pb.GenerateRequest(prompt="hi", prompt_token_ids=[1]), grpc.StatusCode.INVALID_ARGUMENT, "only one"),
    (pb.GenerateRequest(prompt_token_ids=[10**7]), grpc.StatusCode.INVALID_ARGUMENT, "out of range"),
    (pb.GenerateRequest(prompt="hi", adapter_id="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
    (pb.GenerateRequest(prompt="x" * (2 << 20)), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
])
def test_bad_input_gets_a_clear_status(server, req, code, words):
    with pytest.raises(grpc.RpcError) as err:
        collect(server.stub, req)
    assert err.value.code() == code
    assert words in err.value.details()


def test_admin_calls_need_the_admin_token(server):
    req = pb.LoadAdapterRequest(adapter_id="a", path="/tmp/a")
    for md, code in [(None, grpc.StatusCode.UNAUTHENTICATED),
                     ([("authorization", "Bearer wrong")], grpc.StatusCode.PERMISSION_DENIED),
                     ([("authorization", "Basic " + ADMIN)], grpc.StatusCode.UNAUTHENTICATED)]:
        for call, msg in [(server.stub.LoadAdapter, req), (server.stub.UnloadAdapter, pb.UnloadAdapterRequest()),
                          (server.stub.ListAdapters, pb.ListAdaptersRequest())]:
            with pytest.raises(grpc.RpcError) as err:
                call(msg, metadata=md)
            assert err.value.code() == code
    ok = [("authorization", f"Bearer {ADMIN}")]
    assert list(server.stub.ListAdapters(pb.ListAdaptersRequest(), metadata=ok).adapters) == []


def test_health_reflection_and_model_info(server):
    health = health_pb2_grpc.HealthStub(server.channel)
    for svc in ("", "tessera.v1.Inference"):
        assert health.Check(health_pb2.HealthCheckRequest(service=svc)).status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"tessera.v1.Inference", "grpc.health.v1.Health"} <= names
    info = server.stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.max_model_len == 8192 and info.vocab_size == 49152 and info.has_chat_template
    assert info.device == "cpu" and info.weight_bytes > 0
    assert dict(info.cpu_kernels) == {k: "compiled" for k in cpu_ext.KERNELS}  # built at install, not at run time


def test_sigterm_drains(tmp_path):
    srv = ServerProcess(tmp_path, "--shutdown-grace", "60")
    call = srv.stub.Generate(pb.GenerateRequest(prompt="Write a poem about rain.", max_new_tokens=60, ignore_eos=True))
    it = iter(call)
    first = next(it)
    srv.proc.send_signal(signal.SIGTERM)
    health = health_pb2_grpc.HealthStub(srv.channel)
    deadline = time.monotonic() + 10
    while health.Check(health_pb2.HealthCheckRequest()).status != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(grpc.RpcError) as err:
        collect(srv.stub, pb.GenerateRequest(prompt="too late", max_new_tokens=2))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    rest = list(it)
    assert rest[-1].finish_reason == pb.LENGTH and len(first.token_ids) + sum(len(m.token_ids) for m in rest) == 60
    assert srv.proc.wait(60) == 0
