"""Triton SGMV shrink/expand equal their ref_ and a dense per-token oracle, on fresh random inputs,
in every split of tokens across adapters; under TRITON_INTERPRET=1 on the CPU (small shapes), at
real sizes on CUDA. Tolerances: fp32 1e-4 relative to the output scale; fp16/bf16 one rounding of y.
"""
from __future__ import annotations

import pytest
import torch

from kernels.lora_expand import lora_expand
from kernels.lora_shrink import lora_shrink
from kernels.triton_env import interpreting
from tests import lora_scenarios as scen

pytestmark = pytest.mark.skipif(not (interpreting() or torch.cuda.is_available()),
                                reason="Triton needs CUDA or TRITON_INTERPRET=1")


@pytest.mark.parametrize("split", sorted(scen.SPLITS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sgmv_small(split, dtype):
    device = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
    scen.check_sgmv(lora_shrink, lora_expand, split, dtype, dtype, device, T=20, K=64, widths=(32, 16, 16), P=16, rank_choices=[1, 2, 5, 8, 16, 20, 33, 64],
         n_adapters=6, seed=hash((split, str(dtype))) % 2**31)


def test_sgmv_long_segment_and_two_slices():
    """A prefill-like segment longer than one row block, gate/up-like two slices, K over several k-blocks."""
    scen.check_sgmv(lora_shrink, lora_expand, "identical", torch.float32, torch.float32, "cuda" if torch.cuda.is_available() and not interpreting() else "cpu",
         T=70, K=192, widths=(96, 96), P=32, rank_choices=[8, 40], n_adapters=2, seed=7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real sizes need CUDA")
@pytest.mark.parametrize("split", sorted(scen.SPLITS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sgmv_real_sizes_cuda(split, dtype):
    scen.check_sgmv(lora_shrink, lora_expand, split, dtype, dtype, "cuda", T=256, K=4096, widths=(4096, 1024, 1024), P=256,
         rank_choices=[8, 16, 64, 128], n_adapters=32, seed=3)


def test_wrapper_rejects_bad_metadata():
    sc = scen.build([[[4]]], 32, (32,), 16, torch.float32)
    x = torch.randn(3, 32)
    seg = scen.segments([0, 0, 0])
    h = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="int32"):
        lora_shrink(h, x, sc.pool, sc.page_table.long(), sc.pt_start, sc.desc, 0, *seg, 3, 4)
    with pytest.raises(ValueError, match="dtype"):
        lora_shrink(h, x.half(), sc.pool, sc.page_table, sc.pt_start, sc.desc, 0, *seg, 3, 4)
    with pytest.raises(ValueError, match="fp32"):
        lora_shrink(h.half(), x, sc.pool, sc.page_table, sc.pt_start, sc.desc, 0, *seg, 3, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_sgmv_cuda_graph_capture_and_replay():
    """Metadata lives in preallocated buffers, grids depend only on capture bounds: one captured graph
    replays correctly for a different mix of segments written into the same buffers."""
    dtype, K, widths, P, S_MAX, T = torch.bfloat16, 1024, (1024, 256, 256), 256, 8, 64
    g = torch.Generator().manual_seed(11)
    ranks = [[[r, r, r]] for r in (8, 16, 32, 64)]
    sc = scen.build(ranks, K, widths, P, dtype, "cuda", g)
    col_starts = (0, 1024, 1280)
    x = torch.randn(T, K, generator=g).to(dtype).cuda()
    y0 = torch.randn(T, sum(widths), generator=g).to(dtype).cuda()
    y = y0.clone()
    h = torch.zeros(T, 192, device="cuda")
    seg = [torch.zeros(S_MAX, dtype=torch.int32, device="cuda") for _ in range(3)]

    def write(slots):
        s = scen.segments(slots)
        for buf, v in zip(seg, s):
            buf.zero_()
            buf[:v.numel()] = v.cuda()

    def step():
        lora_shrink(h, x, sc.pool, sc.page_table, sc.pt_start, sc.desc, 0, *seg, T, 192)
        lora_expand(y, h, sc.pool, sc.page_table, sc.pt_start, sc.desc, 0, col_starts, widths, *seg, T)

    write([0] * T)
    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for slots in ([i // 8 % 4 for i in range(T)], sorted(i % 3 for i in range(T)), [-1] * 10 + [3] * (T - 10)):
        write(slots)
        y.copy_(y0)
        graph.replay()
        torch.cuda.synchronize()
        want = scen.dense_lora(y0, x, sc, 0, slots, col_starts)
        torch.testing.assert_close(y.float(), want, rtol=1.6e-2, atol=1.6e-2 * want.abs().max().item())
