"""Automatic prefix caching on a chat workload: a shared ~600-token system prompt, 32 requests over 8 LoRA
adapters (r=16, all linear layers), all arriving at once, 32 new tokens each (the embedded SmolLM2).

Three configurations, interleaved in every round (medians over rounds; ratios per round, then the median):
  caching off            --no-enable-prefix-caching
  caching on, cold       the cache is emptied before the round: each adapter's first requests compute the
                         system prompt, the later ones (next steps) start on its blocks
  caching on, warm       the system prompt is still cached from the round before (a chat service's steady
                         state); the users' questions are new in every round

    python bench/bench_prefix_cache.py [--requests 32] [--adapters 8] [--system-tokens 600] [--rounds 3]
                                       [--kv-cache-memory BYTES]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_adapters import CACHE, make_adapters, pct  # noqa: E402
from server.config import EngineConfig  # noqa: E402
from server.engine.engine import LLMEngine  # noqa: E402
from server.engine.request import GenerateRequest, SamplingParams  # noqa: E402

PROSE = Path(__file__).resolve().parent.parent / "tests" / "data" / "prose.txt"


def system_prompt(tokenizer, n_tokens: int) -> str:
    words = PROSE.read_text().split()
    text, k = "", 50
    while len(tokenizer(text).input_ids) < n_tokens and k <= len(words):
        text = "You are a careful assistant. Use this background when you answer:\n" + " ".join(words[:k])
        k += 10
    return text


def requests(system: str, n: int, adapters: list[str], round_no: int, new_tokens: int) -> list[GenerateRequest]:
    topics = ["the river", "the old town", "the harvest", "the winter", "the market", "the bridge", "the school",
              "the mill"]
    return [GenerateRequest(messages=[{"role": "system", "content": system},
                                      {"role": "user", "content": f"Question {round_no}.{i}: what does the text say "
                                                                  f"about {topics[i % len(topics)]}?"}],
                            adapter_id=adapters[i % len(adapters)] if adapters else None, request_id=f"r{round_no}-{i}",
                            sampling=SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
            for i in range(n)]


def run(engine: LLMEngine, reqs: list[GenerateRequest]) -> dict:
    seqs = [engine.make_sequence(r) for r in reqs]  # tokenized (chat template) before the clock starts
    q0, h0, p0 = engine.blocks.prefix_queries, engine.blocks.prefix_hits, engine.scheduler.num_preemptions
    t0 = time.perf_counter()
    for s in seqs:
        engine.add(s)
    first: dict[str, float] = {}
    generated = 0
    while engine.has_work():
        for o in engine.step():
            generated += len(o.token_ids)
            if o.token_ids and o.request_id not in first:
                first[o.request_id] = time.perf_counter() - t0
    wall = time.perf_counter() - t0
    ttft = list(first.values())
    queries, hits = engine.blocks.prefix_queries - q0, engine.blocks.prefix_hits - h0
    return {"tok_s": generated / wall, "ttft_p50": pct(ttft, 0.5), "ttft_p90": pct(ttft, 0.9), "wall": wall,
            "hit_rate": hits / max(1, queries), "prefilled": queries - hits,  # positions run at admissions
            "preemptions": engine.scheduler.num_preemptions - p0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8, help="LoRA adapters the requests are spread over (0: base)")
    ap.add_argument("--system-tokens", type=int, default=600)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kv-cache-memory", type=int, default=1 << 30,
                    help="bytes of KV cache per engine (default 1 GiB: every request's whole context fits with "
                    "caching off too, so neither side is slowed by preemption)")
    args = ap.parse_args()

    engines = {}
    for caching in (False, True):
        engines[caching] = LLMEngine.from_config(EngineConfig(device=args.device, adapter_root=str(CACHE),
                                                              max_num_seqs=64, enable_prefix_caching=caching,
                                                              kv_cache_memory=args.kv_cache_memory))
    names = make_adapters(engines[True].model_config, args.adapters, 16) if args.adapters else []
    for e in engines.values():
        for n in names:
            e.adapters.load(n)
    system = system_prompt(engines[True].tokenizer, args.system_tokens)
    n_sys = len(engines[True].tokenizer(system).input_ids)
    for e in engines.values():  # warm-up, then an empty cache
        run(e, requests(system, 2, names, -1, 2))
        e.reset_prefix_cache()
    labels = ["caching off", "caching on, cold", "caching on, warm"]
    res: dict[str, list[dict]] = {k: [] for k in labels}
    for r in range(args.rounds):
        res["caching off"].append(run(engines[False], requests(system, args.requests, names, 2 * r, args.new_tokens)))
        engines[True].reset_prefix_cache()
        res["caching on, cold"].append(run(engines[True], requests(system, args.requests, names, 2 * r, args.new_tokens)))
        res["caching on, warm"].append(run(engines[True], requests(system, args.requests, names, 2 * r + 1,
                                                                   args.new_tokens)))
        print("  round", r + 1, ", ".join(f"{k}: {v[-1]['tok_s']:.1f} tok/s, TTFT p50 {v[-1]['ttft_p50']:.2f} s"
                                         for k, v in res.items()), flush=True)

    def med(k, f):
        return statistics.median(x[f] for x in res[k])

    print(f"\nSmolLM2-135M on {args.device} ({torch.get_num_threads()} threads): {args.requests} concurrent chat requests "
          f"with a {n_sys}-token system prompt over {args.adapters or 'no'} adapters, {args.new_tokens} new tokens each; "
          f"medians over {args.rounds} interleaved rounds\n")
    print("| configuration | tok/s | vs off | TTFT p50 | TTFT p90 | TTFT p50 vs off | positions prefilled | hit rate "
          "| preemptions |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    off = res["caching off"]
    for k in labels:
        tput = statistics.median(x["tok_s"] / o["tok_s"] for x, o in zip(res[k], off))
        ttft = statistics.median(x["ttft_p50"] / o["ttft_p50"] for x, o in zip(res[k], off))
        print(f"| {k} | {med(k, 'tok_s'):.1f} | {tput:.2f}x | {med(k, 'ttft_p50'):.2f} s | {med(k, 'ttft_p90'):.2f} s | "
              f"{ttft:.2f}x | {med(k, 'prefilled'):.0f} | {med(k, 'hit_rate'):.0%} | {med(k, 'preemptions'):.0f} |")


if __name__ == "__main__":
    main()
