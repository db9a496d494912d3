"""The model on tiny random-weight configs equals transformers' logits within 1e-4 (fp32),
with prompts split into chunks over several steps and read back through the paged KV cache."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from loader.config import ModelConfig
from server.engine.block_manager import BlockManager
from server.engine.model_runner import ModelRunner
from server.engine.scheduler import ScheduledBatch
from server.engine.sequence import Sequence
from server.engine.request import SamplingParams
from server.model.llama import LlamaModel

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)

CONFIGS = {
    "llama": dict(model_type="llama", tie_word_embeddings=False, rope_theta=10000.0, **TINY),
    "llama-tied-mha": dict(model_type="llama", tie_word_embeddings=True, rope_theta=100000.0,
                           **{**TINY, "num_key_value_heads": 4}),
    "llama3-rope": dict(model_type="llama", tie_word_embeddings=False, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, **TINY),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False, rope_theta=1000000.0, **TINY),
    "llama-biases": dict(model_type="llama", tie_word_embeddings=False, rope_theta=10000.0, attention_bias=True,
                         mlp_bias=True, **TINY),
    "mistral": dict(model_type="mistral", tie_word_embeddings=False, rope_theta=10000.0, **TINY),
}


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _models(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    hf_cfg = AutoConfig.for_model(**CONFIGS[name])
    hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # random biases too (Qwen2 q/k/v), so that they are tested
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    cfg = ModelConfig.from_hf_dict(hf_cfg.to_dict(), name=name)
    ours = LlamaModel(cfg, dtype, torch.device(device))
    ours.load_weights(dict(hf.state_dict()))
    return hf, ours


@pytest.mark.parametrize("device,dtype,tol", [("cpu", torch.float32, 1e-4),
                                              pytest.param("cuda", torch.float32, 1e-4, marks=CUDA),
                                              pytest.param("cuda", torch.bfloat16, 6e-2, marks=CUDA)])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers_across_chunked_steps(name, device, dtype, tol):
    hf, ours = _models(name, device, dtype)
    cfg = ours.config
    if cfg.architecture == "qwen2":
        assert ours.layers[0].self_attn.qkv_proj.bias is not None
    gen = torch.Generator().manual_seed(1)
    lengths = [7, 40, 1, 19]
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    block_size = 4
    blocks = BlockManager(num_blocks=64, block_size=block_size)
    runner = ModelRunner(ours, num_blocks=64, block_size=block_size)
    seqs = [Sequence(f"r{i}", p, SamplingParams()) for i, p in enumerate(prompts)]
    # Step plan: (seq index, tokens) per step; decode-sized entries first, as the scheduler orders them.
    plan = [[(2, 1), (0, 7), (1, 10)], [(1, 13), (3, 5)], [(1, 17), (3, 14)]]
    got: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(seqs))}
    for step in plan:
        batch = ScheduledBatch()
        for i, n in step:
            blocks.grow(seqs[i], n)
            batch.seqs.append(seqs[i])
            batch.num_tokens.append(n)
        with torch.inference_mode():
            step_in = runner._prepare(batch)
            logits = ours.logits(ours(step_in.input_ids, step_in.positions, step_in.attn))
        row = 0
        for i, n in step:
            got[i].append(logits[row:row + n])
            row += n
            seqs[i].num_computed += n
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0].float()
        mine = torch.cat(got[i]).cpu()
        assert mine.shape == ref.shape
        torch.testing.assert_close(mine, ref, atol=tol, rtol=tol)


def test_load_weights_reports_missing_tensor():
    hf, ours = _models("llama")
    state = dict(hf.state_dict())
    del state["model.layers.1.self_attn.k_proj.weight"]
    fresh = LlamaModel(ours.config, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="layers.1.self_attn.qkv_proj.weight"):
        fresh.load_weights(state)
