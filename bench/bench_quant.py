"""Decode speed and resident weight bytes of the quantized base (none / int8 / int4 / the GGUF packed).

For each format: resident bytes of the linear layers and of all weights, and decode tokens/s with
1, 8 and 32 sequences decoding together (prompts of 64 tokens; the timed steps are pure decode).

    python bench/bench_quant.py [--device cpu|cuda] [--batches 1 8 32]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.config import EngineConfig  # noqa: E402
from server.engine.engine import LLMEngine  # noqa: E402
from server.engine.request import GenerateRequest, SamplingParams  # noqa: E402


def decode_tps(engine: LLMEngine, batch: int, steps: int = 24, repeats: int = 3) -> float:
    """Best of `repeats` runs (this machine is shared and noisy)."""
    return max(_decode_tps(engine, batch, steps) for _ in range(repeats))


def _decode_tps(engine: LLMEngine, batch: int, steps: int) -> float:
    for i in range(batch):
        engine.add(engine.make_sequence(GenerateRequest(
            prompt_token_ids=[1 + (i * 7 + j) % 1000 for j in range(64)],
            sampling=SamplingParams(max_new_tokens=steps + 8, ignore_eos=True))))
    while any(s.num_computed < len(s.prompt_ids) for s in engine.requests.values()):
        engine.step()
    engine.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    while engine.has_work():
        engine.step()
    return batch * steps / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--model", default=None, help="default: the full-precision copy of the embedded SmolLM2")
    args = ap.parse_args()
    from tests.oracle import hf_smollm2_dir

    full = args.model or str(hf_smollm2_dir())
    runs = [("none (fp32)", full, "none"), ("int8 per-channel", full, "int8"), ("int4 g128", full, "int4"),
            ("GGUF Q4_1 packed (int4 g32)", None, "auto")]
    rows = []
    for label, model, q in runs:
        engine = LLMEngine.from_config(EngineConfig(model=model, quantize=q, device=args.device, max_num_seqs=64))
        linear = sum(lin.nbytes for lin in engine.model.linears())
        _decode_tps(engine, 1, 48)  # warm-up: right after a load this machine runs slow for a few seconds
        tps = [decode_tps(engine, b) for b in args.batches]
        rows.append((label, linear, engine.weight_bytes, tps))
        print(f"  {label}: " + ", ".join(f"B={b} {t:.1f} tok/s" for b, t in zip(args.batches, tps)), flush=True)
        del engine
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu x{torch.get_num_threads()} threads"
    print(f"\nSmolLM2-135M on {dev}, decode tokens/s (ratio to fp32)\n")
    print("| weights | linear MiB | all weights MiB | " + " | ".join(f"B={b}" for b in args.batches) + " |")
    print("|---|---:|---:|" + "---:|" * len(args.batches))
    base = rows[0][3]
    for label, linear, total, tps in rows:
        cells = " | ".join(f"{t:.1f} ({t / b:.2f}x)" for t, b in zip(tps, base))
        print(f"| {label} | {linear / 2**20:.1f} | {total / 2**20:.1f} | {cells} |")


if __name__ == "__main__":
    main()
