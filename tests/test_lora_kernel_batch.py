"""The kernel paths of the LoRA add (KernelLoraBatch: SGMV over page tables, Triton or the C++ CPU
kernels) inside the real model: PEFT-made adapters on a tiny random Llama, a mixed prefill+decode batch
with scattered pool pages; logits equal the torch path (LoraBatch) and PEFT running each adapter
alone. Triton runs in its interpreter on the CPU, natively on CUDA."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kernels import lora_cpu
from kernels.lora_expand import lora_expand
from kernels.lora_shrink import lora_shrink
from kernels.triton_env import interpreting
from loader.config import ModelConfig
from server.adapters.batch import LoraBatch
from server.adapters.kernel_batch import KernelLoraBatch
from server.adapters.manager import AdapterManager
from server.engine.block_manager import BlockManager
from server.engine.model_runner import ModelRunner
from server.engine.request import SamplingParams
from server.engine.scheduler import ScheduledBatch
from server.engine.sequence import Sequence
from server.model.llama import LlamaModel

NO_CXX = pytest.mark.skipif(not lora_cpu.available(), reason="the C++ CPU kernels are not built (run ./setup.sh)")
KERNELS = {  # (shrink, expand, fused shrink+expand or None), as sgmv_ops returns them
    "triton": pytest.param((lora_shrink, lora_expand, None), marks=pytest.mark.skipif(
        not (interpreting() or torch.cuda.is_available()), reason="Triton needs CUDA or TRITON_INTERPRET=1")),
    "cpu": pytest.param((lora_cpu.cpu_lora_shrink, lora_cpu.cpu_lora_expand, None), marks=NO_CXX),
    "cpu-fused": pytest.param((lora_cpu.cpu_lora_shrink, lora_cpu.cpu_lora_expand, lora_cpu.cpu_lora_apply),
                              marks=NO_CXX),
}
TINY = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
            tie_word_embeddings=False, rope_theta=10000.0)


def _peft_adapters(hf, root, names=None, bf16_exact=False):
    """PEFT-made adapters with random weights (bf16_exact: every weight a bf16 value, and scales powers of 2)."""
    from peft import LoraConfig, get_peft_model

    specs = {
        "r4-qv": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "r16-all": LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules="all-linear"),
        "r33-mlp": LoraConfig(r=33, lora_alpha=33, target_modules=["gate_proj", "down_proj"]),
        "dora": LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=["k_proj", "up_proj", "o_proj"]),
    }
    peft_models = {}
    for i, (name, cfg) in enumerate(specs.items()):
        if names is not None and name not in names:
            continue
        m = get_peft_model(copy.deepcopy(hf), cfg)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_A" in n or "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                    if bf16_exact:
                        p.copy_(p.bfloat16().float())
                elif "magnitude" in n:
                    p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
        m.save_pretrained(root / name)
        peft_models[name] = m.eval()
    return peft_models


def _run_batch(runner, blocks, work, prompts, tag, mgr):
    """One step over `work` [(adapter or None, tokens)] through `runner`: (logits [T, vocab], the step's applier)."""
    batch = ScheduledBatch()
    for i, ((adapter, n), p) in enumerate(zip(work, prompts)):
        s = Sequence(f"{tag}{i}", p, SamplingParams(), adapter_id=adapter,
                     adapter=mgr.acquire(adapter) if adapter else None)
        blocks.grow(s, n)
        batch.seqs.append(s)
        batch.num_tokens.append(n)
    with torch.inference_mode():
        step = runner._prepare(batch)
        lora = runner._adapter_batch(step.spans, step.input_ids.numel())
        logits = runner.model.logits(runner.model(step.input_ids, step.positions, step.attn, adapters=lora)).cpu()
    for s in batch.seqs:
        blocks.free(s)
        if s.adapter is not None:
            mgr.release(s.adapter)
    return logits, lora


def _assert_equals_peft(logits, work, prompts, hf, peft_models):
    row = 0
    for (adapter, n), p in zip(work, prompts):
        oracle = hf if adapter is None else peft_models[adapter]
        with torch.no_grad():
            want = oracle(torch.tensor([p])).logits[0].float()
        torch.testing.assert_close(logits[row:row + n], want, rtol=1e-4, atol=1e-4)
        row += n


@pytest.mark.parametrize("ops", list(KERNELS.values()), ids=list(KERNELS))
def test_kernel_batch_equals_torch_path_and_peft(tmp_path, ops):
    on_cuda = ops[0] is lora_shrink and torch.cuda.is_available() and not interpreting()
    device = torch.device("cuda" if on_cuda else "cpu")
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY), dtype=torch.float32).eval()
    peft_models = _peft_adapters(hf, tmp_path)
    model = LlamaModel(ModelConfig.from_hf_dict(hf.config.to_dict(), name="tiny"), torch.float32, device)
    model.load_weights(dict(hf.state_dict()))
    mgr = AdapterManager(model, adapter_root=tmp_path, device_memory=4 << 20, host_memory=64 << 20, max_lora_rank=64)
    held = [mgr.pool.allocate(1) for _ in range(mgr.pool.num_pages)]
    for h in held[::2]:  # only every other page free: adapters get scattered pages
        mgr.pool.free(h)
    for name in peft_models:
        mgr.load(name)
        assert mgr.make_resident(name)
    assert any(mgr.entries[n].device.groups[(0, "q_proj")].A is None for n in ("r4-qv", "r16-all")), "pages not scattered"

    gen = torch.Generator().manual_seed(1)
    work = [("r4-qv", 1), (None, 1), ("r16-all", 1), ("r16-all", 1), ("dora", 1),  # decode-like single tokens
            ("r33-mlp", 9), ("r4-qv", 21), (None, 5), ("dora", 17), ("r16-all", 40)]  # prefill chunks
    if ops[2] is not None:  # the fused call serves steps without DoRA (DoRA scales y between the two)
        work = [w if w[0] != "dora" else ("r33-mlp", w[1]) for w in work]
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for _, n in work]
    blocks = BlockManager(num_blocks=64, block_size=4)
    logits = {}
    for cls in (LoraBatch, KernelLoraBatch):
        runner = ModelRunner(model, num_blocks=64, block_size=4, pool=mgr.pool)
        runner.lora_batch = LoraBatch.build if cls is LoraBatch else functools.partial(KernelLoraBatch.build, ops=ops)
        logits[cls], lora = _run_batch(runner, blocks, work, prompts, cls.__name__, mgr)
        assert isinstance(lora, cls)
        if cls is KernelLoraBatch:
            assert lora.fused is ops[2]
    torch.testing.assert_close(logits[KernelLoraBatch], logits[LoraBatch], rtol=1e-4, atol=1e-4)
    _assert_equals_peft(logits[KernelLoraBatch], work, prompts, hf, peft_models)
    base = hf(torch.tensor([prompts[6]])).logits[0]
    assert (logits[KernelLoraBatch][8:8 + 21] - base).abs().max() > 1e-2, "the adapter must change the logits"


@pytest.mark.parametrize("path", ["default", "torch"])
def test_bf16_pool_equals_peft_on_bf16_exact_adapters(tmp_path, path):
    """--lora-dtype bfloat16 on the CPU: the pool holds bf16 pages (twice as many for the same bytes), the
    math stays fp32, so adapters whose weights are bf16 values give PEFT's fp32 logits, through the
    runner's own kernel choice (the C++ SGMV) and through the torch fallback (upcast per step)."""
    if path == "default" and not lora_cpu.available():
        pytest.skip("the C++ CPU kernels are not built (run ./setup.sh)")
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY), dtype=torch.float32).eval()
    peft_models = _peft_adapters(hf, tmp_path, names=("r4-qv", "r16-all", "r33-mlp"), bf16_exact=True)
    model = LlamaModel(ModelConfig.from_hf_dict(hf.config.to_dict(), name="tiny"), torch.float32, torch.device("cpu"))
    model.load_weights(dict(hf.state_dict()))
    kw = dict(adapter_root=tmp_path, device_memory=1 << 20, host_memory=64 << 20, max_lora_rank=64)
    mgr = AdapterManager(model, lora_dtype=torch.bfloat16, **kw)
    assert mgr.pool.buffer.dtype == torch.bfloat16
    assert mgr.pool.num_pages == 2 * AdapterManager(model, **kw).pool.num_pages
    for name in peft_models:
        mgr.load(name)
        assert mgr.make_resident(name)
    runner = ModelRunner(model, num_blocks=64, block_size=4, pool=mgr.pool)
    if path == "torch":
        runner.lora_batch = LoraBatch.build
    gen = torch.Generator().manual_seed(2)
    work = [("r4-qv", 1), ("r16-all", 1), (None, 1), ("r33-mlp", 1), ("r16-all", 12), ("r4-qv", 40)]
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for _, n in work]
    logits, lora = _run_batch(runner, BlockManager(num_blocks=64, block_size=4), work, prompts, path, mgr)
    assert isinstance(lora, KernelLoraBatch if path == "default" else LoraBatch)
    _assert_equals_peft(logits, work, prompts, hf, peft_models)
