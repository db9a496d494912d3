"""The CPU batched-LoRA kernel on a decode step against this machine's memory bandwidth.

S-LoRA's setting on the embedded SmolLM2's shapes: every one of N decoding sequences has its own adapter
(ranks 8/16/32/64 in turn on q/k/v/o, bf16 pool pages), so a step reads each adapter's weights once, for
one token: the kernel is bound by memory, not arithmetic. One "step" is the 30 layers' two LoRA calls
(fused q/k/v, then o), each layer's adapters in pages of their own (442 MB at N=64, far past the L3).
Pages in pool order (a fresh pool) and scattered at random (a pool after much eviction), in interleaved
rounds; the roofline is a streaming read of as many bytes (torch's fp32 sum, both threads).
`--big-pool GIB` adds the same pages in 12 KB runs at random places of one pool of that size (a server's
--adapter-memory after churn), in 4 KB pages and in huge pages (server/hugepages.py), each round after a
cache-flushing read.

    python bench/bench_lora_cpu.py [--adapters 64] [--rounds 8] [--big-pool 1.5]
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels import lora_cpu  # noqa: E402
from server import hugepages  # noqa: E402
from tests import lora_scenarios as scen  # noqa: E402

HIDDEN, KV, LAYERS, PAGE = 576, 192, 30, 192  # SmolLM2-135M; the pool's page is the gcd of its row widths
RANKS = (8, 16, 32, 64)
KEYS = (((HIDDEN, KV, KV), (0, HIDDEN, HIDDEN + KV)), ((HIDDEN,), (0,)))  # (widths, column starts)


def build_step(n: int, scattered: bool, seed: int):
    """Per layer and key: a pool holding n adapters' pages, in order or permuted."""
    g, calls = torch.Generator().manual_seed(seed), []
    perm = torch.randperm
    try:
        if not scattered:  # scen.build scatters pages with randperm: the identity keeps them in order
            torch.randperm = lambda k, generator=None: torch.arange(k)
        for layer in range(LAYERS):
            for widths, cols in KEYS:
                ranks = [[[RANKS[(i + layer) % len(RANKS)]] * len(widths)] for i in range(n)]
                sc = scen.build(ranks, HIDDEN, widths, PAGE, torch.bfloat16, gen=g)
                sc.dense = None
                calls.append((sc, widths, cols))
    finally:
        torch.randperm = perm
    return calls


def run_step(calls, x, ys, segs, max_rank):
    for sc, widths, cols in calls:
        lora_cpu.cpu_lora_apply(ys[widths], x, sc.pool, sc.page_table, sc.pt_start, sc.desc, 0, cols, widths, *segs,
                                max_rank * len(widths))


def big_pool_step(calls, gib: float, huge: bool, run: int = 32, seed: int = 2):
    """The calls' pages copied into one pool of `gib` GiB in runs of `run` pages at random places."""
    page_bytes = PAGE * 2
    total = int(gib * 2**30) // page_bytes // run * run
    pool = hugepages.zeros((total, PAGE), torch.bfloat16, "cpu") if huge else torch.zeros(total, PAGE, dtype=torch.bfloat16)
    slots, at, out = torch.randperm(total // run, generator=torch.Generator().manual_seed(seed)), 0, []
    for sc, widths, cols in calls:
        n = sc.pool.shape[0]
        k = -(-n // run)
        rows = (slots[at:at + k].repeat_interleave(run) * run + torch.arange(run).repeat(k))[:n]
        at += k
        pool[rows] = sc.pool
        out.append((dataclasses.replace(sc, pool=pool, page_table=rows[sc.page_table.long()].to(torch.int32)), widths, cols))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", type=int, default=64, help="decoding sequences, each with its own adapter")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--big-pool", type=float, default=0.0, metavar="GIB",
                    help="also the pages in 12 KB runs over one pool of this many GiB, 4 KB and huge pages")
    args = ap.parse_args()
    if not lora_cpu.available():
        raise SystemExit("the CPU kernels are not built: ./setup.sh")
    n = args.adapters
    layouts = {"pages in order": build_step(n, False, 1), "pages scattered": build_step(n, True, 1)}
    nbytes = sum(sc.pool.numel() * sc.pool.element_size() for sc, *_ in layouts["pages in order"])
    if args.big_pool:
        for huge in (False, True):
            layouts[f"12 KB runs over {args.big_pool:g} GiB, {'huge' if huge else '4 KB'} pages"] = \
                big_pool_step(layouts["pages in order"], args.big_pool, huge)
    stream = torch.randn(nbytes // 4)
    x = torch.randn(n, HIDDEN)
    ys = {w: torch.zeros(n, sum(w)) for w, _ in KEYS}
    segs = scen.segments(list(range(n)))
    times = {name: [] for name in (*layouts, "streaming read")}
    for _ in range(args.rounds):
        for name, calls in layouts.items():
            if args.big_pool:
                stream.sum()  # the previous layout's pages out of the caches
            else:
                run_step(calls, x, ys, segs, max(RANKS))
            t0 = time.perf_counter()
            run_step(calls, x, ys, segs, max(RANKS))
            times[name].append(time.perf_counter() - t0)
        stream.sum()
        t0 = time.perf_counter()
        stream.sum()
        times["streaming read"].append(time.perf_counter() - t0)
    print(f"{n} distinct adapters, one token each, {nbytes / 1e6:.0f} MB of LoRA weights per step, "
          f"{torch.get_num_threads()} threads, medians of {args.rounds} interleaved rounds\n")
    print("| | ms per step | GB/s | vs streaming read |\n|---|---:|---:|---:|")
    roof = statistics.median(times["streaming read"])
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {t * 1e3:.1f} | {nbytes / t / 1e9:.1f} | {roof / t:.2f}x |")


if __name__ == "__main__":
    main()
