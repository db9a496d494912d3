"""The CPU SGMV kernels (kernels/cpu/lora_sgmv.cpp) equal their ref_ and a dense per-token oracle, on
fresh random inputs, in every split of tokens across adapters, with fp32 and bf16 pools (fp32
activations): decode-like segments, long segments (cut into blocks of at most 64 tokens) and both
mixed, page sizes that are and are not multiples of 16 lanes (masked tails). Tolerance: fp32, 1e-4 relative to the output scale (the pool's bf16 values upcast exactly).
"""
from __future__ import annotations

import pytest
import torch

from kernels import lora_cpu
from tests import lora_scenarios as scen

pytestmark = [pytest.mark.skipif(not lora_cpu.available(), reason="the C++ CPU kernels are not built (run ./setup.sh)"),
              pytest.mark.usefixtures("cpu_threads")]  # one thread, and the blocks split over two
SGMV = (lora_cpu.cpu_lora_shrink, lora_cpu.cpu_lora_expand)


@pytest.mark.parametrize("split", sorted(scen.SPLITS))
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_cpu_sgmv_every_split(split, pool_dtype):
    scen.check_sgmv(*SGMV, split, pool_dtype, torch.float32, "cpu", T=41, K=96, widths=(64, 32, 32), P=32,
                    rank_choices=[1, 2, 5, 8, 16, 20, 33, 64], n_adapters=6, seed=hash((split, str(pool_dtype))) % 2**31)


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_cpu_sgmv_long_segments_split_into_blocks_and_mix_with_short(pool_dtype):
    """'identical' puts all 150 tokens in one segment (three blocks); 'zipf' mixes long and short ones."""
    for split in ("identical", "zipf"):
        scen.check_sgmv(*SGMV, split, pool_dtype, torch.float32, "cpu", T=150, K=192, widths=(96, 96), P=32,
                        rank_choices=[8, 40], n_adapters=3, seed=7)


@pytest.mark.parametrize("P", [8, 24, 40])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_cpu_sgmv_page_sizes_with_masked_tails(P, pool_dtype):
    """Pages of 8, 24 and 40 elements: rows end in a partial 16-lane vector (the masked loads/stores)."""
    for split in ("zipf", "distinct"):
        scen.check_sgmv(*SGMV, split, pool_dtype, torch.float32, "cpu", T=70, K=3 * P, widths=(2 * P, 5 * P), P=P,
                        rank_choices=[1, 3, 4, 7, 16], n_adapters=4, seed=P)


def test_cpu_sgmv_real_model_shapes_decode():
    """SmolLM2's fused q/k/v shape and page size, 32 decode tokens of 32 adapters at rank 16."""
    scen.check_sgmv(*SGMV, "distinct", torch.float32, torch.float32, "cpu", T=32, K=576, widths=(576, 192, 192),
                    P=192, rank_choices=[16], n_adapters=32, seed=5)


def test_cpu_wrapper_rejects_what_it_cannot_take():
    sc = scen.build([[[4]]], 32, (32,), 16, torch.float32)
    x = torch.randn(3, 32)
    seg = scen.segments([0, 0, 0])
    h = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="int32"):
        lora_cpu.cpu_lora_shrink(h, x, sc.pool, sc.page_table.long(), sc.pt_start, sc.desc, 0, *seg)
    with pytest.raises(ValueError, match="fp32 activations"):
        lora_cpu.cpu_lora_shrink(h, x.half(), sc.pool, sc.page_table, sc.pt_start, sc.desc, 0, *seg)
    with pytest.raises(ValueError, match="output slices"):
        lora_cpu.cpu_lora_expand(torch.zeros(3, 32), h, sc.pool, sc.page_table, sc.pt_start, sc.desc, 0, (), (), *seg)


@pytest.mark.parametrize("split", sorted(scen.SPLITS))
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_cpu_fused_apply_equals_the_dense_oracle(split, pool_dtype):
    """cpu_lora_apply (shrink + expand in one call, the engine's per-Linear path without DoRA)."""
    g = torch.Generator().manual_seed(11)
    widths, K, P, T, n_adapters = (48, 24, 24), 72, 24, 90, 5
    ranks = [[[int(r) for r in torch.randint(0, 20, (len(widths),), generator=g)]] for _ in range(n_adapters)]
    sc = scen.build(ranks, K, widths, P, pool_dtype, gen=g)
    slots = scen.SPLITS[split](T, n_adapters, g)
    seg = scen.segments(slots, empty_every=2)
    x, y0 = torch.randn(T, K, generator=g), torch.randn(T, sum(widths), generator=g)
    cols = tuple(sum(widths[:j]) for j in range(len(widths)))
    max_rank = max(sum(r[0]) for r in ranks)
    got = lora_cpu.cpu_lora_apply(y0.clone(), x, sc.pool, sc.page_table, sc.pt_start, sc.desc, 0, cols, widths, *seg,
                                  max_rank)
    want = scen.dense_lora(y0, x, sc, 0, slots, cols)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_cpu_kernels_reject_out_of_range_metadata():
    """The C++ side checks what would otherwise read or write out of bounds: segments past the token rows,
    slots past the step's adapters, h narrower than a rank."""
    sc = scen.build([[[4]], [[8]]], 32, (32,), 16, torch.float32)
    x, y = torch.randn(6, 32), torch.zeros(6, 32)
    ok = scen.segments([0, 0, 1, 1, 1, 1])
    lora_cpu.cpu_lora_apply(y, x, sc.pool, sc.page_table, sc.pt_start, sc.desc, 0, (0,), (32,), *ok, 8)
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    with pytest.raises(RuntimeError, match="segment out of range"):
        lora_cpu.cpu_lora_apply(y, x, sc.pool, sc.page_table, sc.pt_start, sc.desc, 0, (0,), (32,),
                                i32([4]), i32([3]), i32([0]), 8)
    with pytest.raises(RuntimeError, match="segment out of range"):
        lora_cpu.cpu_lora_apply(y, x, sc.pool, sc.page_table, sc.pt_start, sc.desc, 0, (0,), (32,),
                                i32([0]), i32([2]), i32([2]), 8)
    with pytest.raises(RuntimeError, match="fewer columns than a rank"):
        lora_cpu.cpu_lora_apply(y, x, sc.pool, sc.page_table, sc.pt_start, sc.desc, 0, (0,), (32,), *ok, 4)
