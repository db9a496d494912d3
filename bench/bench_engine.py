"""Engine throughput vs. transformers `generate` on the same prompts (the embedded SmolLM2).

For each concurrency N: N requests with mixed prompt lengths and mixed max_new_tokens.
  ours: requests arrive staggered (one every --stagger-ms) into the continuously batched engine.
  transformers: all N prompts at once in one left-padded `generate` batch (its best case), run
                until the longest request is done; only each request's own tokens are counted.
tokens/s = generated tokens / wall time. Prints a table with the ratio.

    python bench/bench_engine.py [--concurrency 1 8 32] [--device cpu|cuda] [--dtype float32|bfloat16]
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.config import EngineConfig  # noqa: E402
from server.engine.engine import LLMEngine  # noqa: E402
from server.engine.request import GenerateRequest, SamplingParams  # noqa: E402

TEXT = (Path(__file__).resolve().parent.parent / "tests" / "data" / "prose.txt")
FILLER = ("It was a bright cold day in April, and the clocks were striking the hour as the travellers "
          "reached the edge of the old forest, where the road turned north toward the hills. ")


def make_workload(tokenizer, n: int, seed: int, min_prompt: int, max_prompt: int, min_new: int, max_new: int):
    rng = random.Random(seed)
    words = (TEXT.read_text() if TEXT.exists() else FILLER * 200).split()
    work = []
    for _ in range(n):
        plen = rng.randint(min_prompt, max_prompt)
        start = rng.randint(0, max(0, len(words) - 4 * plen))
        ids = tokenizer(" ".join(words[start:start + 2 * plen])).input_ids[:plen]
        work.append((ids, rng.randint(min_new, max_new)))
    return work


def run_ours(engine: LLMEngine, work, stagger_s: float) -> tuple[float, int]:
    reqs = [GenerateRequest(prompt_token_ids=ids, sampling=SamplingParams(max_new_tokens=m, ignore_eos=True))
            for ids, m in work]
    t0 = time.perf_counter()
    generated, i = 0, 0
    while i < len(reqs) or engine.has_work():
        now = time.perf_counter() - t0
        while i < len(reqs) and now >= i * stagger_s:
            engine.add(engine.make_sequence(reqs[i]))
            i += 1
        if engine.has_work():
            generated += sum(len(o.token_ids) for o in engine.step())
        else:
            time.sleep(max(0.0, i * stagger_s - now))
    _sync(engine.device)
    return time.perf_counter() - t0, generated


def run_hf(model, work, device) -> tuple[float, int]:
    width = max(len(ids) for ids, _ in work)
    pad = 2
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in work], device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in work], device=device)
    longest = max(m for _, m in work)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                       do_sample=False, pad_token_id=pad)
    _sync(device)
    return time.perf_counter() - t0, sum(m for _, m in work)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--stagger-ms", type=float, default=50.0, help="gap between arrivals for our engine")
    ap.add_argument("--min-prompt", type=int, default=16)
    ap.add_argument("--max-prompt", type=int, default=384)
    ap.add_argument("--min-new", type=int, default=32)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--quantize", default="none", help="none (fp32, like transformers; the default), auto (the GGUF's Q4_1 packed), int8, int4")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from tests.oracle import hf_smollm2_dir
    dtype = getattr(torch, args.dtype)
    engine = LLMEngine.from_config(EngineConfig(device=args.device, dtype=args.dtype, kv_cache_memory=1 << 30,
                                                quantize=args.quantize,
                                                max_num_seqs=64, max_num_batched_tokens=512))
    hf = AutoModelForCausalLM.from_pretrained(hf_smollm2_dir(), dtype=dtype).to(args.device).eval()
    # warm-up both
    run_ours(engine, make_workload(engine.tokenizer, 2, 99, 8, 16, 4, 4), 0)
    run_hf(hf, make_workload(engine.tokenizer, 2, 99, 8, 16, 4, 4), args.device)

    rows = []
    for n in args.concurrency:
        work = make_workload(engine.tokenizer, n, args.seed + n, args.min_prompt, args.max_prompt,
                             args.min_new, args.max_new)
        t_ours, tok_ours = run_ours(engine, work, args.stagger_ms / 1000)
        t_hf, tok_hf = run_hf(hf, work, args.device)
        rows.append((n, tok_ours / t_ours, tok_hf / t_hf, t_ours, t_hf))
        print(f"  N={n}: ours {tok_ours} tok in {t_ours:.2f}s, transformers {tok_hf} tok in {t_hf:.2f}s", flush=True)

    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu x{torch.get_num_threads()} threads"
    print(f"\nSmolLM2-135M {args.dtype}, weights {engine.quantization}, on {dev}; prompts {args.min_prompt}-{args.max_prompt} tok, "
          f"new {args.min_new}-{args.max_new} tok; ours staggered every {args.stagger_ms:g} ms\n")
    print("| concurrent | tessera tok/s | transformers tok/s | ratio |")
    print("|---:|---:|---:|---:|")
    for n, ours, ref, _, _ in rows:
        print(f"| {n} | {ours:.1f} | {ref:.1f} | {ours / ref:.2f}x |")


if __name__ == "__main__":
    main()
