"""Structured output's cost in the engine (the embedded SmolLM2): 32 concurrent requests constrained by a JSON
schema against the same 32 unconstrained, every request generating exactly --new-tokens tokens (the schema, an
array of at least 64 short strings, cannot complete sooner; the free ones ignore EOS), rounds interleaved; and
the time to first token with a cold schema (compiled for the request) against a cached one.

    python bench/bench_structured.py [--concurrency 32] [--new-tokens 32] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.config import EngineConfig  # noqa: E402
from server.engine.engine import LLMEngine  # noqa: E402
from server.engine.request import GenerateRequest, SamplingParams  # noqa: E402
from server.engine.structured import StructuredOutput  # noqa: E402

LONG = {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 64}
PROMPT = "List many fruit names as a JSON array of strings."


def one_round(engine: LLMEngine, n: int, new: int, constrained: bool) -> tuple[float, int]:
    so = StructuredOutput(json_schema=json.dumps(LONG)) if constrained else None
    reqs = [GenerateRequest(messages=[{"role": "user", "content": f"{PROMPT} ({i})"}], structured=so,
                            sampling=SamplingParams(max_new_tokens=new, ignore_eos=not constrained))
            for i in range(n)]
    t0 = time.perf_counter()
    for r in reqs:
        engine.add(engine.make_sequence(r))
    tokens = 0
    while engine.has_work():
        for o in engine.step():
            tokens += len(o.token_ids)
            assert o.error is None, o.error
    return time.perf_counter() - t0, tokens


def ttft(engine: LLMEngine, schema: dict) -> tuple[float, float]:
    """-> (seconds to validate + compile, seconds to the first token) for one request alone."""
    r = GenerateRequest(prompt="JSON:", structured=StructuredOutput(json_schema=json.dumps(schema)),
                        sampling=SamplingParams(max_new_tokens=1))
    t0 = time.perf_counter()
    engine.add(engine.make_sequence(r))
    t1 = time.perf_counter()
    while engine.has_work():
        engine.step()
    return t1 - t0, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    engine = LLMEngine.from_config(EngineConfig(device=args.device, enable_prefix_caching=False))
    one_round(engine, 4, 4, True)  # warm: the grammar tables, the kernels
    one_round(engine, 4, 4, False)
    rows = {True: [], False: []}
    for _ in range(args.rounds):
        for constrained in (False, True):
            rows[constrained].append(one_round(engine, args.concurrency, args.new_tokens, constrained))
    print(f"\n{args.concurrency} concurrent requests x {args.new_tokens} tokens, {args.rounds} interleaved rounds "
          f"({engine.device}):")
    print("| requests | tok/s per round | median tok/s |")
    print("|---|---|---:|")
    med = {}
    for constrained in (False, True):
        tps = [tok / sec for sec, tok in rows[constrained]]
        med[constrained] = statistics.median(tps)
        print(f"| {'JSON schema' if constrained else 'unconstrained'} | {', '.join(f'{x:.1f}' for x in tps)} "
              f"| {med[constrained]:.1f} |")
    ratios = [(tc / sc) / (tu / su) for (sc, tc), (su, tu) in zip(rows[True], rows[False])]
    print(f"constrained / unconstrained throughput: {statistics.median(ratios):.3f}x (per-round "
          f"{', '.join(f'{r:.3f}' for r in ratios)}; overhead {100 * (1 - statistics.median(ratios)):.1f}%)")
    cold = []
    cached = []
    for i in range(5):
        schema = {"type": "object", "properties": {f"field_{i}_{j}": {"type": "integer"} for j in range(8)},
                  "required": [f"field_{i}_0"]}
        cold.append(ttft(engine, schema))
        cached.append(ttft(engine, schema))
    print("\n| schema | compile + validate ms (median) | TTFT ms (median) |")
    print("|---|---:|---:|")
    for name, xs in (("cold", cold), ("cached", cached)):
        print(f"| {name} | {1000 * statistics.median(c for c, _ in xs):.1f} | "
              f"{1000 * statistics.median(t for _, t in xs):.1f} |")


if __name__ == "__main__":
    main()
