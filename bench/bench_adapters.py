"""Mixed-adapter throughput and adapter load latency (the embedded SmolLM2).

32 concurrent requests (all arriving at once), each with its own prompt, using 1, 8 or 32 distinct
LoRA adapters (r=16 on all linear layers), against the same load on the base model alone, and
against PEFT's mixed-batch `generate(adapter_names=...)` on the same prompts (left-padded, one batch;
run in every round next to ours). Then adapter load latency: from disk (read + validate + convert)
and from host memory (copy into pool pages after an eviction).

    python bench/bench_adapters.py [--requests 32] [--new-tokens 32] [--skip-peft] [--max-num-batched-tokens N]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loader.adapters.lora import module_dims, random_lora, save_adapter  # noqa: E402
from server.config import EngineConfig  # noqa: E402
from server.engine.engine import LLMEngine  # noqa: E402
from server.engine.request import GenerateRequest, SamplingParams  # noqa: E402

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "bench-adapters"


def make_adapters(cfg, n: int, rank: int) -> list[str]:
    """n PEFT-format LoRA adapters (r=rank, all linear layers, random weights) under CACHE."""
    names = []
    for i in range(n):
        name = f"r{rank}-all-{i:02d}"
        out = CACHE / name
        names.append(name)
        if (out / "adapter_model.safetensors").exists():
            continue
        tensors = random_lora(cfg, rank, module_dims(cfg), torch.Generator().manual_seed(i), None, 0.02)
        save_adapter(out, {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
                           "target_modules": sorted(module_dims(cfg)), "bias": "none", "lora_dropout": 0.0}, tensors)
    return names


def make_prompt_adapters(cfg, n: int, kind: str, nvt: int = 16) -> list[str]:
    """n PEFT-format prefix-tuning or prompt-tuning adapters (nvt virtual tokens, random) under CACHE."""
    names = []
    kv = cfg.num_key_value_heads * cfg.head_dim
    width = cfg.num_hidden_layers * 2 * kv if kind == "prefix" else cfg.hidden_size
    for i in range(n):
        name = f"{kind}-{nvt}-{i:02d}"
        out = CACHE / name
        names.append(name)
        if (out / "adapter_model.safetensors").exists():
            continue
        g = torch.Generator().manual_seed(100 + i)
        ptype = "PREFIX_TUNING" if kind == "prefix" else "PROMPT_TUNING"
        save_adapter(out, {"peft_type": ptype, "task_type": "CAUSAL_LM", "num_virtual_tokens": nvt,
                           "token_dim": kv if kind == "prefix" else cfg.hidden_size, "num_transformer_submodules": 1,
                           "num_layers": cfg.num_hidden_layers},
                     {"prompt_embeddings": torch.randn(nvt, width, generator=g) * (0.5 if kind == "prefix" else 0.05)})
    return names


def workload(tokenizer, n: int, new_tokens: int) -> list[list[int]]:
    words = (Path(__file__).resolve().parent.parent / "tests" / "data" / "prose.txt").read_text().split()
    return [tokenizer(" ".join(words[i * 37:i * 37 + 24 + (i * 13) % 64])).input_ids for i in range(n)]


def run_ours(engine: LLMEngine, prompts, adapters, new_tokens: int) -> float:
    engine.reset_prefix_cache()  # every round repeats the prompts: each run computes them, as before caching
    for i, ids in enumerate(prompts):
        engine.add(engine.make_sequence(GenerateRequest(
            prompt_token_ids=ids, adapter_id=adapters[i % len(adapters)] if adapters else None,
            sampling=SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))))
    t0, generated = time.perf_counter(), 0
    while engine.has_work():
        generated += sum(len(o.token_ids) for o in engine.step())
    return generated / (time.perf_counter() - t0)


def run_peft(model, prompts, adapter_names, new_tokens: int) -> float:
    width = max(map(len, prompts))
    ids = torch.tensor([[2] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, adapter_names=adapter_names, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=2)
    return len(prompts) * new_tokens / (time.perf_counter() - t0)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--distinct", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the configurations (medians kept)")
    ap.add_argument("--prompt-kinds", type=int, default=8,
                    help="also 8 prefix-tuning and 8 prompt-tuning adapters (16 virtual tokens); 0 = skip")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-num-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens,
                    help="the engine's token budget per step (the server's default unless given)")
    ap.add_argument("--no-bf16-pool", dest="bf16_pool", action="store_false",
                    help="skip the row with the largest adapter count served from a bf16 pool")
    args = ap.parse_args()

    engine = LLMEngine.from_config(EngineConfig(device=args.device, adapter_root=str(CACHE), adapter_memory=2 << 30,
                                                max_num_seqs=64, max_num_batched_tokens=args.max_num_batched_tokens))
    names = make_adapters(engine.model_config, max(args.distinct), args.rank)
    for n in names:
        engine.adapters.load(n)
    prompts = workload(engine.tokenizer, args.requests, args.new_tokens)
    run_ours(engine, prompts[:2], None, 2)  # warm-up
    configs = [("base only", engine, None)] + [(f"{k} distinct", engine, names[:k]) for k in args.distinct]
    if args.bf16_pool:  # the same adapters in a second engine whose pool holds bf16 pages (--lora-dtype bfloat16)
        engine16 = LLMEngine.from_config(EngineConfig(device=args.device, adapter_root=str(CACHE), adapter_memory=1 << 30,
                                                      max_num_seqs=64, lora_dtype="bfloat16",
                                                      max_num_batched_tokens=args.max_num_batched_tokens))
        k = max(args.distinct)
        for n in names[:k]:
            engine16.adapters.load(n)
        run_ours(engine16, prompts[:2], None, 2)
        configs.append((f"{k} distinct, bf16 pool", engine16, names[:k]))
    for kind in ("prefix", "prompt") if args.prompt_kinds else ():
        kn = make_prompt_adapters(engine.model_config, args.prompt_kinds, kind)
        for n in kn:
            engine.adapters.load(n)
        configs.append((f"{args.prompt_kinds} {kind}-tuning adapters (16 virtual tokens)", engine, kn))
    peft_model, k = None, max(args.distinct)
    if not args.skip_peft:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from tests.oracle import hf_smollm2_dir
        base = AutoModelForCausalLM.from_pretrained(hf_smollm2_dir(), dtype=torch.float32).eval()
        peft_model = PeftModel.from_pretrained(base, CACHE / names[0], adapter_name=names[0])
        for n in names[1:k]:
            peft_model.load_adapter(CACHE / n, adapter_name=n)
        run_peft(peft_model, prompts[:2], [names[0], names[1]], 2)  # warm-up
    # rounds over all configurations: this machine is shared and noisy (identical runs swing 1.5x), so each
    # round runs every configuration back to back (PEFT's mixed batch too) and each ratio is taken against the
    # same round's base-only / PEFT run; the table reports medians over rounds (tok/s and ratios)
    tps: dict[str, list[float]] = {label: [] for label, _, _ in configs}
    peft_runs: list[float] = []
    for r in range(args.rounds):
        for label, eng, adapters in configs:
            tps[label].append(run_ours(eng, prompts, adapters, args.new_tokens))
            print(f"  round {r + 1} ours {label}: {tps[label][-1]:.1f} tok/s", flush=True)
        if peft_model is not None:
            peft_runs.append(run_peft(peft_model, prompts, [names[i % k] for i in range(len(prompts))], args.new_tokens))
            print(f"  round {r + 1} PEFT {k} distinct mixed: {peft_runs[-1]:.1f} tok/s", flush=True)
    base_runs = tps[configs[0][0]]
    rows = [(label, statistics.median(tps[label]),
             statistics.median(t / b for t, b in zip(tps[label], base_runs)),
             statistics.median(t / p for t, p in zip(tps[label], peft_runs)) if peft_runs else None)
            for label, _, _ in configs]
    peft_tps = statistics.median(peft_runs) if peft_runs else None

    # load latency: disk (unload + load) and host (evict from the pool + make resident)
    disk, host = [], []
    mgr = engine.adapters
    for n in names:
        mgr.unload(n)
        t0 = time.perf_counter()
        mgr.load(n)
        disk.append(time.perf_counter() - t0)
        mgr.make_resident(n)
    for n in names * 3:  # three passes: p99 over 96 reloads
        mgr._evict(mgr.entries[n])
        t0 = time.perf_counter()
        assert mgr.make_resident(n)
        host.append(time.perf_counter() - t0)

    mib = mgr.entries[names[0]].nbytes / 2**20
    print(f"\nSmolLM2-135M (linear layers: {engine.quantization}; adapters fp32) on {args.device} ({torch.get_num_threads()} threads); {args.requests} concurrent "
          f"requests, {args.new_tokens} new tokens each; adapters r={args.rank} on all linear layers "
          f"({mib:.1f} MiB each); medians over {args.rounds} interleaved rounds (ratios: per round, then the median)\n")
    print("| load | tok/s | vs base only (same round) | vs PEFT mixed |")
    print("|---|---:|---:|---:|")
    for label, t, ratio, vs in rows:
        vs_peft = f"{vs:.2f}x" if vs is not None and label.startswith(f"{k} ") else ""
        print(f"| {label} | {t:.1f} | {ratio:.2f}x | {vs_peft} |")
    if peft_tps:
        peft_base = statistics.median(p / b for p, b in zip(peft_runs, base_runs))
        print(f"| PEFT {k} distinct, mixed batch | {peft_tps:.1f} | {peft_base:.2f}x | 1.00x |")
    print(f"\nadapter load latency over {len(names)} adapters: disk p50 {pct(disk, .5) * 1000:.1f} ms, "
          f"p99 {pct(disk, .99) * 1000:.1f} ms; host p50 {pct(host, .5) * 1000:.2f} ms, "
          f"p99 {pct(host, .99) * 1000:.2f} ms")


if __name__ == "__main__":
    main()
