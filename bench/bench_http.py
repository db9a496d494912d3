"""HTTP (OpenAI-compatible) vs gRPC streaming on one server: the price of the HTTP face.

Starts the real server (`python -m server`, the embedded SmolLM2) once, then runs interleaved rounds of
--streams concurrent streaming requests (greedy, ignore_eos, --new-tokens each, distinct prompts) over
gRPC (grpc.aio), over HTTP with the `openai` SDK (AsyncOpenAI, SSE parsed into its pydantic chunks) and
over HTTP with a bare SSE reader (httpx2, the SDK's own transport). Clients run on the same machine as the
server, as in the tests. Prints generated tokens/s, mean time to first token and the ratio to gRPC.

    python bench/bench_http.py [--streams 32] [--new-tokens 64] [--rounds 3] [--num-adapters 0]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import httpx2  # noqa: E402
import openai  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from proto import tessera_pb2 as pb  # noqa: E402
from proto import tessera_pb2_grpc as pb_grpc  # noqa: E402

TOPICS = ["the sea", "a city at night", "mountains", "an old library", "rain", "a train journey", "autumn",
          "the moon", "a market", "winter light", "a garden", "the desert"]


def prompts(n: int) -> list[str]:
    return [f"Write a short story about {TOPICS[i % len(TOPICS)]} (version {i}):" for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, adapter_root: Path | None):
    port, http_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "server", "--port", str(port), "--http-port", str(http_port), "--metrics-port", "-1",
           "--log-level", "WARNING"]
    if adapter_root is not None:
        cmd += ["--adapter-root", str(adapter_root)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=os.environ.copy())
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        deadline = time.monotonic() + 300
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    break
            except grpc.RpcError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.3)
    return proc, f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}"


async def run_grpc(target: str, jobs, n_new: int):
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.InferenceStub(ch)

        async def one(prompt, adapter):
            t0, first, n = time.perf_counter(), None, 0
            async for m in stub.Generate(pb.GenerateRequest(prompt=prompt, adapter_id=adapter or "",
                                                            max_new_tokens=n_new, ignore_eos=True)):
                if m.token_ids and first is None:
                    first = time.perf_counter() - t0
                n += len(m.token_ids)
            return n, first

        return await asyncio.gather(*(one(p, a) for p, a in jobs))


async def run_openai(base_url: str, jobs, n_new: int):
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="bench", max_retries=0, timeout=600,
                                http_client=httpx2.AsyncClient(limits=httpx2.Limits(max_connections=256), timeout=600))

    async def one(prompt, adapter):
        t0, first, n = time.perf_counter(), None, 0
        stream = await client.completions.create(model=adapter or "base", prompt=prompt, max_tokens=n_new,
                                                 temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True, "return_token_ids": True})
        async for c in stream:
            k = len((c.choices[0].model_extra or {}).get("token_ids", ())) if c.choices else 0
            if k and first is None:
                first = time.perf_counter() - t0
            n += k
        return n, first

    try:
        return await asyncio.gather(*(one(p, a) for p, a in jobs))
    finally:
        await client.close()


async def run_raw_sse(base_url: str, jobs, n_new: int):
    async with httpx2.AsyncClient(limits=httpx2.Limits(max_connections=256), timeout=600) as http:
        async def one(prompt, adapter):
            t0, first, n = time.perf_counter(), None, 0
            body = {"model": adapter or "base", "prompt": prompt, "max_tokens": n_new, "temperature": 0,
                    "stream": True, "ignore_eos": True, "return_token_ids": True}
            async with http.stream("POST", f"{base_url}/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    k = len(json.loads(line[6:])["choices"][0]["token_ids"])
                    if k and first is None:
                        first = time.perf_counter() - t0
                    n += k
            return n, first

        return await asyncio.gather(*(one(p, a) for p, a in jobs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-adapters", type=int, default=0, help="distinct rank-16 LoRA adapters across the streams")
    args = ap.parse_args()
    root, names = None, [None]
    if args.num_adapters:
        from gguf import GGUFReader

        from bench.bench_adapters import CACHE, make_adapters
        from loader.embedded import default_model_path
        from loader.gguf_config import config_from_gguf
        path = Path(default_model_path())
        names = make_adapters(config_from_gguf(GGUFReader(path), path), args.num_adapters, 16)
        root = CACHE
    proc, target, base_url = start_server(args, root)
    try:
        # "base" is not the served name: map it (the served name is the model's own)
        served = httpx2.get(f"{base_url}/v1/models").json()["data"][0]["id"]
        jobs = [(p, names[i % len(names)] or served) for i, p in enumerate(prompts(args.streams))]
        grpc_jobs = [(p, None if a == served else a) for p, a in jobs]
        asyncio.run(run_grpc(target, grpc_jobs[:max(4, len(names))], 4))  # load every adapter, warm the clients
        runners = {"gRPC (grpc.aio)": lambda: run_grpc(target, grpc_jobs, args.new_tokens),
                   "HTTP (openai SDK)": lambda: run_openai(base_url, jobs, args.new_tokens),
                   "HTTP (bare SSE)": lambda: run_raw_sse(base_url, jobs, args.new_tokens)}
        rates = {k: [] for k in runners}
        ttfts = {k: [] for k in runners}
        for r in range(args.rounds):
            for name, fn in runners.items():
                t0 = time.perf_counter()
                res = asyncio.run(fn())
                dt = time.perf_counter() - t0
                tokens = sum(n for n, _ in res)
                assert tokens == args.streams * args.new_tokens, (name, tokens)
                rates[name].append(tokens / dt)
                ttfts[name].append(statistics.mean(f for _, f in res))
                print(f"round {r + 1} {name:18s} {tokens / dt:7.1f} tok/s  ttft {ttfts[name][-1]:.3f}s", flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    ref = statistics.median(rates["gRPC (grpc.aio)"])
    print(f"\n{args.streams} concurrent streams x {args.new_tokens} tokens, {len(names)} model(s), "
          f"{args.rounds} interleaved rounds (median)")
    print("| client | tokens/s | mean TTFT s | vs gRPC |")
    print("|---|---|---|---|")
    for name in runners:
        med = statistics.median(rates[name])
        print(f"| {name} | {med:.1f} | {statistics.median(ttfts[name]):.3f} | {med / ref:.2f}x |")


if __name__ == "__main__":
    main()
