"""The quantized base: formats against their reference, GGUF blocks converted without loss, the
packed SmolLM2 equal to transformers' dequantized load, memory, perplexity, LoRA on top."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from kernels.quant import from_ggml_blocks, pack_int4, quantize_int4, quantize_int8, ref_dequantize, unpack_int4
from kernels.quant_matmul import cpu_extension, cpu_quant_linear, ref_quant_linear
from server.config import EngineConfig
from tests import smollm2
from tests.perplexity import all_logits, perplexity

PROSE = Path(__file__).resolve().parent / "data" / "prose.txt"


def test_pack_roundtrip_and_rtn_error_bounds():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (7, 96), generator=g, dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    w = torch.randn(64, 576, generator=g)
    for gs in (32, 64, 128):
        qw = quantize_int4(w, gs)
        assert qw.scales.shape == (64, -(-576 // gs)) and qw.scales.dtype == torch.float16
        err = (ref_dequantize(qw) - w).abs()
        step = qw.scales.float().repeat_interleave(gs, 1)[:, :576]
        assert bool((err <= step / 2 + 1e-3).all())  # round to nearest: within half a step
    q8 = quantize_int8(w)
    assert (ref_dequantize(q8) - w).abs().max() <= q8.scales.float().max() / 2 + 1e-4


@pytest.mark.parametrize("kind,qtype", [("Q4_0", GGMLQuantizationType.Q4_0), ("Q4_1", GGMLQuantizationType.Q4_1),
                                        ("Q8_0", GGMLQuantizationType.Q8_0)])
def test_ggml_blocks_convert_without_loss(kind, qtype):
    w = np.random.default_rng(1).standard_normal((24, 256)).astype(np.float32)
    raw = quantize(w, qtype)  # uint8 [24, bytes]
    want = dequantize(raw, qtype).reshape(24, 256)
    ours = ref_dequantize(from_ggml_blocks(torch.from_numpy(raw), kind, 256)).numpy()
    assert np.array_equal(ours, want)


@pytest.mark.skipif(cpu_extension() is None, reason="the C++ CPU kernels are not built (run ./setup.sh)")
@pytest.mark.parametrize("fmt", ["int4g32", "int4g64", "int4g128", "int8", "int8g32"])
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 31, 32, 33, 45, 64, 65, 96, 97, 160, 161, 300])
def test_cpu_kernel_equals_reference(fmt, rows, cpu_threads):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(80, 576, generator=g)
    qw = {"int4g32": lambda: quantize_int4(w, 32), "int4g64": lambda: quantize_int4(w, 64),
          "int4g128": lambda: quantize_int4(w, 128), "int8": lambda: quantize_int8(w),
          "int8g32": lambda: quantize_int8(w, 32)}[fmt]()
    x, bias = torch.randn(rows, 576, generator=g), torch.randn(80, generator=g)
    want = ref_quant_linear(x.double(), type(qw)(qw.bits, qw.qweight, qw.scales, qw.mins, qw.group_size), bias.double())
    got = cpu_quant_linear(x, qw, bias)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)  # fp32 accumulation vs fp64


@pytest.mark.skipif(cpu_extension() is None, reason="the C++ CPU kernels are not built (run ./setup.sh)")
def test_cpu_kernels_refuse_inconsistent_packed_weights():
    """Scales or mins with the wrong rows or groups would make the kernels read past their buffers: every
    entry point (GEMV, tiled, dequantize) of both formats refuses them before reading."""
    ext, g = cpu_extension(), torch.Generator().manual_seed(0)
    w4, w8 = quantize_int4(torch.randn(48, 128, generator=g), 32), quantize_int8(torch.randn(48, 128, generator=g), 32)
    x, out = torch.randn(20, 128, generator=g), torch.empty(48 * 128)
    calls4 = [lambda q, s, m: ext.int4_linear(x, q, s, m, 32), lambda q, s, m: ext.int4_linear_tiled(x, q, s, m, 32),
              lambda q, s, m: ext.int4_dequantize(q, s, m, 32, out)]
    calls8 = [lambda q, s: ext.int8_linear(x, q, s, 32), lambda q, s: ext.int8_linear_tiled(x, q, s, 32),
              lambda q, s: ext.int8_dequantize(q, s, 32, out)]
    for call in calls4:
        call(w4.qweight, w4.scales, w4.mins)  # consistent: accepted
        for bad in ((w4.qweight, w4.scales[:40], w4.mins[:40]),  # rows
                    (w4.qweight, w4.scales[:, :2].contiguous(), w4.mins[:, :2].contiguous()),  # groups
                    (w4.qweight, w4.scales, w4.mins[:40]), (w4.qweight, w4.scales.float(), w4.mins)):
            with pytest.raises(RuntimeError, match="int4"):
                call(*bad)
    for call in calls8:
        call(w8.qweight, w8.scales)
        for bad in ((w8.qweight, w8.scales[:40]), (w8.qweight, w8.scales[:, :2].contiguous()),
                    (w8.qweight.to(torch.uint8), w8.scales)):
            with pytest.raises(RuntimeError, match="int8"):
                call(*bad)
    with pytest.raises(RuntimeError, match="x: contiguous"):
        ext.int4_linear_tiled(x.t(), w4.qweight, w4.scales, w4.mins, 32)


@pytest.fixture(scope="module")
def prose_ids():
    from transformers import AutoTokenizer

    from tests.oracle import hf_smollm2_dir
    return AutoTokenizer.from_pretrained(hf_smollm2_dir())(PROSE.read_text()).input_ids[:2048]


def test_packed_q4_1_equals_transformers_dequantized(prose_ids):
    from tests.oracle import hf_smollm2

    engine = smollm2.engine(EngineConfig(quantize="auto"))
    assert engine.quantization == "int4 g32"  # served packed, straight from the GGUF blocks
    head = engine.model.head_q  # the tied LM head from the GGUF's Q8_0 embedding, also packed
    assert head is not None and head.bits == 8 and head.group_size == 32
    ids = prose_ids[:300]
    ours = all_logits(engine, ids)
    with torch.no_grad():
        ref = hf_smollm2()(torch.tensor([ids])).logits[0].float()
    assert (ours - ref).abs().max().item() < 2e-3  # fp32 rounding over 30 layers, logits of magnitude ~30
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_tied_lm_head_served_from_the_packed_q8_0_embedding():
    """The embedded GGUF stores the tied embedding as Q8_0: the head's matmul reads those int8 values (4x
    fewer bytes per decode step) and equals the dense head on the lookup's (exactly dequantized) weights."""
    packed = smollm2.engine(EngineConfig(quantize="auto")).model
    dense = smollm2.engine(EngineConfig(quantize="none")).model
    assert dense.head_q is None and packed.head_q is not None
    assert dense.packed_embedding is None  # unused by a dense head: not kept (~29 MiB)
    assert torch.equal(packed.embed_tokens.weight, dense.embed_tokens.weight)  # the lookup: exact values
    assert torch.equal(ref_dequantize(packed.head_q), dense.embed_tokens.weight)
    n = dense.embed_tokens.weight.numel()
    head_bytes = packed.weight_bytes - sum(lin.qweight.nbytes for lin in packed.linears()) - n * 4
    assert 1.0 * n <= head_bytes < 1.1 * n + 2**20  # int8 values + one fp16 scale per 32, counted once
    g = torch.Generator().manual_seed(0)
    for rows in (1, 5, 32, 100):  # GEMV, tiled and dequantize+sgemm paths
        hidden = torch.randn(rows, packed.config.hidden_size, generator=g)
        want = hidden.double() @ dense.embed_tokens.weight.double().T
        got = packed.logits(hidden)
        assert got.dtype == torch.float32 and got.shape == (rows, packed.config.vocab_size)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_resident_bytes_of_linear_layers():
    """Quantizing the full-precision SmolLM2 (int4 at group 128); the GGUF's own Q4_1 (group 32, fp16 scale
    and min per 32 weights) is 0.3125x by construction."""
    from tests.oracle import hf_smollm2_dir

    sizes = {}
    for q in ("none", "int8", "int4"):
        engine = smollm2.engine(EngineConfig(model=str(hf_smollm2_dir()), quantize=q))
        sizes[q] = sum(lin.qweight.nbytes if lin.qweight is not None else lin.weight.numel() * 2
                       for lin in engine.model.linears())  # dense counted as bf16
    assert sizes["int4"] <= 0.30 * sizes["none"], sizes
    assert sizes["int8"] <= 0.55 * sizes["none"], sizes


@pytest.mark.slow
def test_perplexity_of_requantized_models(prose_ids):
    """SmolLM2 dequantized to fp32 (transformers' load of the GGUF), requantized by round-to-nearest.

    The only SmolLM2 here is already Q4_1 (4-bit grids over groups of 32): requantizing to int4 at its own
    group size is exact, at coarser groups two grids collide (+24% at 64, +37% at 128 on this text: see
    bench/RESULTS.md). int8 stays within 1%."""
    from tests.oracle import hf_smollm2_dir

    def ppl(q, g=128):
        return perplexity(smollm2.engine(EngineConfig(model=str(hf_smollm2_dir()), quantize=q,
                                                             quant_group_size=g)), prose_ids)

    base, int8, int4_g32, int4_g128 = ppl("none"), ppl("int8"), ppl("int4", 32), ppl("int4", 128)
    print(f"perplexity fp32 {base:.3f} int8 {int8:.3f} int4-g32 {int4_g32:.3f} int4-g128 {int4_g128:.3f}")
    assert len(prose_ids) >= 2000
    assert int8 <= base * 1.01
    assert int4_g32 <= base * 1.05
    assert base < int4_g128 <= base * 1.6  # far from the 5% goal: see the docstring
