"""Batched LoRA (Triton SGMV over the paged pool) and the int4/int8 matmul against the roofline.

LoRA rows: one adapted Linear (hidden -> hidden) for T tokens spread evenly over n distinct adapters
of rank r, weights in scattered pool pages. Compared with the torch reference the issue names
("gather_bmm": gather every token's A and B, two bmm) and a per-adapter loop ("loop": two matmuls per
segment on dense weights), and with the base layer's own bf16 matmul (`base_ms`, Punica's
backbone-vs-LoRA figure). Roofline: the bytes the op must move (x, y read+write, each distinct
adapter's A and B once, h) over the HBM bandwidth measured here by a device copy.
Quant rows: y = x @ dequant(W).T at hidden x hidden for int4 g128 and int8, against bf16 torch.matmul.

    python bench/bench_kernels.py [--out bench/kernels.jsonl] [--quick]
Needs CUDA for meaningful figures. `TRITON_INTERPRET=1 python bench/bench_kernels.py --smoke` runs
tiny shapes on the CPU to check the script itself.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels.lora_expand import lora_expand  # noqa: E402
from kernels.lora_shrink import lora_shrink  # noqa: E402
from kernels.quant import quantize_int4, quantize_int8  # noqa: E402
from kernels.quant_matmul import triton_quant_linear  # noqa: E402
from tests import lora_scenarios as scen  # noqa: E402


def bench_ms(fn, device: str) -> float:
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=50)
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def hbm_gbps(device: str) -> float:
    a = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a), device)
    return 2 * a.numel() / ms / 1e6


def lora_rows(device: str, dtype: torch.dtype, hiddens, ranks, tokens, adapters, bw: float):
    P = 256 if hiddens[0] % 256 == 0 else 64
    for hdim in hiddens:
        for r in ranks:
            n_max = max(a for a in adapters)
            g = torch.Generator().manual_seed(hdim + r)
            sc = scen.build([[[r]] for _ in range(n_max)], hdim, (hdim,), P, dtype, device, g)
            A = torch.stack([d[0][0] for d in sc.dense]).to(device)  # [n, r, h]
            Bt = torch.stack([d[0][1][0] for d in sc.dense]).to(device)  # [n, r, h]
            W = torch.randn(hdim, hdim, device=device, dtype=dtype) / hdim ** 0.5
            for T in tokens:
                for n in adapters:
                    if n > T:
                        continue
                    slots = [i * n // T for i in range(T)]  # sorted: n contiguous segments
                    seg = [s.to(device) for s in scen.segments(slots)]
                    slot_t = torch.tensor(slots, device=device)
                    x = torch.randn(T, hdim, device=device, dtype=dtype)
                    y = torch.zeros(T, hdim, device=device, dtype=dtype)
                    h = torch.empty(T, r, device=device)
                    max_len = -(-T // n)

                    def sgmv():
                        lora_shrink(h, x, sc.pool, sc.page_table, sc.pt_start, sc.desc, 0, *seg, max_len, r)
                        lora_expand(y, h, sc.pool, sc.page_table, sc.pt_start, sc.desc, 0, (0,), (hdim,), *seg, max_len)

                    def gather_bmm():
                        hh = torch.bmm(x[:, None, :], A[slot_t].transpose(1, 2))
                        y.add_(torch.bmm(hh, Bt[slot_t])[:, 0])

                    bounds = [(i * T // n, (i + 1) * T // n) for i in range(n)]

                    def loop():
                        for a, (s0, s1) in enumerate(bounds):
                            if s1 > s0:
                                y[s0:s1] += (x[s0:s1] @ A[a].t()) @ Bt[a]

                    e = x.element_size()
                    nbytes = T * hdim * e * 3 + n * r * hdim * e * 2 + T * r * 4 * 2
                    flops = 4 * T * r * hdim
                    row = dict(op="lora", hidden=hdim, rank=r, tokens=T, adapters=n, dtype=str(dtype)[6:],
                               base_ms=bench_ms(lambda: x @ W.t(), device), roofline_ms=nbytes / bw / 1e6)
                    for name, fn in (("sgmv", sgmv), ("gather_bmm", gather_bmm), ("loop", loop)):
                        if name == "gather_bmm" and T * r * hdim * e * 2 > (4 << 30):
                            continue  # the gathered copies would not fit
                        ms = bench_ms(fn, device)
                        row[f"{name}_ms"] = ms
                    row["sgmv_gbps"] = nbytes / row["sgmv_ms"] / 1e6
                    row["sgmv_tflops"] = flops / row["sgmv_ms"] / 1e9
                    row["sgmv_roofline_frac"] = row["roofline_ms"] / row["sgmv_ms"]
                    row["lora_over_base"] = row["sgmv_ms"] / row["base_ms"]
                    yield row


def quant_rows(device: str, dtype: torch.dtype, hiddens, tokens, bw: float):
    for hdim in hiddens:
        w = torch.randn(hdim, hdim) * 0.02
        for label, qw in (("int4-g128", quantize_int4(w, 128)), ("int8", quantize_int8(w))):
            qw = qw.to(device)
            dense = w.to(device, dtype)
            for T in tokens:
                x = torch.randn(T, hdim, device=device, dtype=dtype)
                nbytes = qw.nbytes + T * hdim * x.element_size() * 2
                ms = bench_ms(lambda: triton_quant_linear(x, qw), device)
                bf = bench_ms(lambda: torch.matmul(x, dense.t()), device)
                yield dict(op="quant_matmul", format=label, hidden=hdim, tokens=T, dtype=str(dtype)[6:], ms=ms,
                           torch_dense_ms=bf, speedup=bf / ms, gbps=nbytes / ms / 1e6, roofline_frac=nbytes / bw / 1e6 / ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/kernels.jsonl")
    ap.add_argument("--quick", action="store_true", help="a smaller grid")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (checks the script under TRITON_INTERPRET=1)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.smoke:
        hiddens, ranks, tokens, adapters = [128], [8], [1, 16], [1, 4]
    elif args.quick:
        hiddens, ranks, tokens, adapters = [4096], [16, 64, 128], [1, 64, 256, 1024], [1, 8, 64, 256]
    else:
        hiddens, ranks, tokens, adapters = [4096, 5120, 8192], [8, 16, 64, 128], [1, 16, 64, 256, 1024], [1, 8, 64, 256]
    bw = hbm_gbps(device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device {name}, measured copy bandwidth {bw:.0f} GB/s, {dtype}")
    rows = list(lora_rows(device, dtype, hiddens, ranks, tokens, adapters, bw))
    rows += list(quant_rows(device, dtype, hiddens, [1, 16, 256] if not args.smoke else [1], bw))
    with open(args.out, "w") as f:
        for r in rows:
            f.write(json.dumps({"device": name, "hbm_gbps": bw, **r}) + "\n")
    print(f"\n{'hidden':>6} {'rank':>4} {'tokens':>6} {'adapt':>5} | {'sgmv ms':>8} {'%roof':>5} {'TFLOP/s':>7} | "
          f"{'gather_bmm':>10} {'loop':>8} | {'base ms':>8} {'lora/base':>9}")
    for r in (r for r in rows if r["op"] == "lora"):
        gb = f"{r['gather_bmm_ms']:10.3f}" if "gather_bmm_ms" in r else f"{'-':>10}"
        print(f"{r['hidden']:>6} {r['rank']:>4} {r['tokens']:>6} {r['adapters']:>5} | {r['sgmv_ms']:8.3f} "
              f"{100 * r['sgmv_roofline_frac']:5.0f} {r['sgmv_tflops']:7.2f} | {gb} {r['loop_ms']:8.3f} | "
              f"{r['base_ms']:8.3f} {r['lora_over_base']:9.2f}")
    print(f"\n{'format':>10} {'hidden':>6} {'tokens':>6} | {'ms':>8} {'GB/s':>7} {'%roof':>5} | {'dense ms':>8} {'speedup':>7}")
    for r in (r for r in rows if r["op"] == "quant_matmul"):
        print(f"{r['format']:>10} {r['hidden']:>6} {r['tokens']:>6} | {r['ms']:8.3f} {r['gbps']:7.0f} "
              f"{100 * r['roofline_frac']:5.0f} | {r['torch_dense_ms']:8.3f} {r['speedup']:7.2f}")
    print(f"\nwrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
