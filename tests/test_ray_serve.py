"""Issue 21, Tessera on Ray Serve (`python -m server.ray`) as a real local Ray cluster on this machine: two
replicas, six adapters requested interleaved over the OpenAI HTTP API and gRPC (Ray's gRPC proxy with the
project's proto). Every answer equals a single engine's greedy tokens; each adapter's requests after its first
are served by the replica that loaded it (the x-tessera-replica header, the tessera-replica trailing metadata);
killing one replica's actor process leaves the other serving, and Ray starts a replacement."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import grpc
import httpx2 as httpx
import pytest

from proto import tessera_pb2 as pb
from proto import tessera_pb2_grpc as pb_grpc
from server.config import EngineConfig
from server.engine.request import GenerateRequest, SamplingParams
from tests import smollm2
from tests.peft_adapters import build
from tests.server_proc import ROOT, free_port

pytest.importorskip("ray.serve", reason="Ray Serve is in the test extra")
pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ADAPTERS = ("r4-qv", "r8-all-linear", "r16-rslora-attn", "dora-r8", "patterns", "regex-r6")
PROMPT = "The three most important things about"
N = 8
REPLICA_TITLE = "ServeReplica:tessera:TesseraReplica"
ENGINE_FLAGS = ["--kv-cache-memory", "48MiB", "--adapter-memory", "96MiB", "--max-num-seqs", "16"]


def replica_pids() -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return {int(line.split()[0]) for line in out.splitlines()[1:] if REPLICA_TITLE in line}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("adapter-root")
    for name in ADAPTERS:
        shutil.copytree(build(name), r / name)
    return r


@pytest.fixture(scope="module")
def want(root):
    """The single engine's greedy tokens for each adapter (and the base)."""
    engine = smollm2.engine(EngineConfig(adapter_root=str(root)))
    for name in ADAPTERS:
        engine.adapters.load(name)
    out = {}
    for adapter in (None, *ADAPTERS):
        engine.add(engine.make_sequence(GenerateRequest(prompt=PROMPT, adapter_id=adapter,
                                                        sampling=SamplingParams(max_new_tokens=N))))
        ids = []
        while engine.has_work():
            ids += [t for o in engine.step() for t in o.token_ids]
        out[adapter] = ids
    return out


@pytest.fixture(scope="module")
def cluster(root, tmp_path_factory):
    port, http_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("ray") / "ray-serve.log"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "server.ray", "--replicas", "2", "--port", str(port),
                             "--http-port", str(http_port), "--metrics-port", "-1", "--adapter-root", str(root),
                             "--max-adapters-per-replica", "6", *ENGINE_FLAGS], cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, log.read_text()[-5000:]
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "Ray Serve app not healthy in 300 s:\n" + log.read_text()[-5000:]
        time.sleep(1)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield type("Cluster", (), {"base": base, "stub": pb_grpc.InferenceStub(channel), "proc": proc, "log": log})
    channel.close()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True, timeout=60)


def over_http(c, adapter):
    r = httpx.post(f"{c.base}/v1/completions", timeout=300, json={
        "model": adapter or "SmolLM2-135M-Instruct", "prompt": PROMPT, "max_tokens": N, "temperature": 0,
        "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"], r.headers["x-tessera-replica"]


def over_http_streaming(c, adapter):
    ids = []
    with httpx.stream("POST", f"{c.base}/v1/completions", timeout=300, json={
            "model": adapter, "prompt": PROMPT, "max_tokens": N, "temperature": 0, "stream": True,
            "return_token_ids": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: {"):
                ids += json.loads(line[6:])["choices"][0].get("token_ids") or []
        return ids, r.headers["x-tessera-replica"]


def over_grpc(c, adapter):
    call = c.stub.Generate(pb.GenerateRequest(prompt=PROMPT, adapter_id=adapter or "", max_new_tokens=N),
                           timeout=300)
    ids = [t for m in call for t in m.token_ids]
    return ids, dict(call.trailing_metadata())["tessera-replica"]


def test_adapter_affinity_over_http_and_grpc_and_a_replica_killed(cluster, want):
    served: dict[str, list[str]] = {}
    for rnd in range(2):
        for i, adapter in enumerate(ADAPTERS):
            ids, replica = (over_http if (rnd + i) % 2 == 0 else over_grpc)(cluster, adapter)
            assert ids == want[adapter], (adapter, rnd)
            served.setdefault(adapter, []).append(replica)
    assert over_http(cluster, None)[0] == want[None] and over_grpc(cluster, None)[0] == want[None]
    streamed, replica = over_http_streaming(cluster, ADAPTERS[0])  # SSE through the ingress
    assert streamed == want[ADAPTERS[0]] and replica == served[ADAPTERS[0]][0]
    for adapter, replicas in served.items():  # the first request's replica loaded it; the later ones go there
        assert all(r == replicas[0] for r in replicas), served
    assert len({r[-1] for r in served.values()}) == 2, served  # both replicas hold adapters
    names = {r[-1] for r in served.values()}
    assert all(re.fullmatch(r".+@.+:\d+", n) for n in names)
    before = replica_pids()
    assert len(before) == 2
    victim = next(iter(names))
    pid = int(victim.rsplit(":", 1)[1])
    assert pid in before
    os.kill(pid, signal.SIGKILL)
    for adapter in ADAPTERS:  # the survivor serves everyone, right after the kill
        ids, replica = (over_http if adapter in ADAPTERS[::2] else over_grpc)(cluster, adapter)
        assert ids == want[adapter] and replica != victim, (adapter, replica)
    deadline = time.monotonic() + 120
    while not (len(replica_pids()) == 2 and pid not in replica_pids()):  # Ray replaced the dead actor
        assert time.monotonic() < deadline, "no replacement replica:\n" + cluster.log.read_text()[-3000:]
        time.sleep(1)


def test_bad_requests_get_clear_status_through_ray(cluster):
    r = httpx.post(f"{cluster.base}/v1/completions", timeout=60, json={"model": "no-such-adapter", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    r = httpx.post(f"{cluster.base}/v1/completions", timeout=60, json={"prompt": "x", "temperature": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature", r.text
    with pytest.raises(grpc.RpcError) as err:
        list(cluster.stub.Generate(pb.GenerateRequest(prompt="x", temperature=-1.0), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in err.value.details()


def test_the_serve_config_file_validates_and_builds_the_application():
    """deploy/ray/tessera.yaml against Ray's own config schema, and its import path builds the app (no cluster)."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from server.ray.app import GRPC_SERVICER, build_app

    cfg = yaml.safe_load((ROOT / "deploy" / "ray" / "tessera.yaml").read_text())
    schema = ServeDeploySchema.model_validate(cfg) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(cfg)
    (tessera,) = schema.applications
    assert tessera.import_path == "server.ray.app:build_app" and GRPC_SERVICER in cfg["grpc_options"][
        "grpc_servicer_functions"]
    app = build_app(tessera.args)
    assert type(app).__name__ == "Application"
    with pytest.raises(SystemExit):  # a bad flag fails as python -m server's would
        build_app({"server_args": ["--no-such-flag"]})
