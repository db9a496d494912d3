"""The trainer's adapters on a tiny random Llama, against PEFT as the oracle:
saved adapters load in PEFT with equal logits (LoRA, rsLoRA, DoRA, prefix with/without projection,
prompt); LoRA/DoRA gradients equal PEFT's for the same parameters; the QLoRA path (int4 base)
differentiates like the dense model with the dequantized weights."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from loader.config import ModelConfig
from server.model.llama import LlamaModel
from server.train.adapters import TrainableLora, TrainablePrefix, TrainablePrompt
from server.train.checkpoint import save_adapter
from server.train.step import loss_sum, real_token_logits

pytestmark = pytest.mark.slow  # the real SmolLM2 and its oracles: minutes, not seconds

TINY = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
            tie_word_embeddings=False, rope_theta=10000.0)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY), dtype=torch.float32).eval()
    ours = LlamaModel(ModelConfig.from_hf_dict(hf.config.to_dict(), name="tiny"), torch.float32, torch.device("cpu"))
    ours.load_weights(dict(hf.state_dict()))
    ours.requires_grad_(False)
    return hf, ours


def _lora(model, **kw):
    args = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", use_rslora=False, use_dora=False,
                layers_to_transform=None, base_name="tiny", generator=torch.Generator().manual_seed(0))
    args.update(kw)
    a = TrainableLora(model, **args)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return a


def _peft(hf, adapter, tmp_path):
    from peft import PeftModel

    save_adapter(adapter, tmp_path / "a")
    return PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "a")).eval()


def _ids(s=11, b=2, seed=3):
    return torch.randint(0, 256, (b, s), generator=torch.Generator().manual_seed(seed))


ADAPTERS = {
    "lora": lambda m: _lora(m),
    "lora-qv-rslora-layer1": lambda m: _lora(m, target_modules=["q_proj", "v_proj"], use_rslora=True,
                                             layers_to_transform=[1]),
    "dora": lambda m: _lora(m, use_dora=True, target_modules=["k_proj", "o_proj", "up_proj", "down_proj"]),
    "prefix": lambda m: TrainablePrefix(m, num_virtual_tokens=5, projection=False, encoder_hidden_size=32,
                                        base_name="tiny", generator=torch.Generator().manual_seed(0)),
    "prefix-projection": lambda m: TrainablePrefix(m, num_virtual_tokens=5, projection=True, encoder_hidden_size=32,
                                                   base_name="tiny", generator=torch.Generator().manual_seed(0)),
    "prompt": lambda m: TrainablePrompt(m, None, num_virtual_tokens=6, init="random", init_text=None,
                                        base_name="tiny", generator=torch.Generator().manual_seed(0)),
}


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_saved_adapter_loads_in_peft_with_equal_logits(models, kind, tmp_path):
    hf, ours = models
    adapter = ADAPTERS[kind](ours).eval()
    ids = _ids()
    mine = real_token_logits(ours, adapter, ids)
    peft = _peft(hf, adapter, tmp_path)
    with torch.no_grad():
        want = peft(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -ids.shape[1]:].float()
        base = hf(ids).logits
    torch.testing.assert_close(mine, want, rtol=1e-4, atol=1e-4)
    assert (mine - base).abs().max() > 1e-2, "the adapter must change the logits"


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_lora_gradients_equal_peft(models, kind, tmp_path):
    hf, ours = models
    adapter = ADAPTERS[kind](ours).train()
    peft = _peft(hf, adapter, tmp_path)
    peft.train()
    for n, p in peft.named_parameters():
        p.requires_grad_("lora_" in n)
    ids = _ids(seed=5)
    labels = ids.clone()
    labels[:, :3] = -100
    lengths = torch.tensor([ids.shape[1]] * ids.shape[0])
    s, n = loss_sum(ours, adapter, ids, labels, lengths)
    s.backward()
    peft_loss = peft(input_ids=ids, labels=labels).loss  # mean over the shifted labelled tokens
    peft_loss.backward()
    torch.testing.assert_close(s / n, peft_loss, rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in peft.named_parameters() if p.grad is not None}
    checked = 0
    for name, t in adapter.peft_tensors().items():
        layer, mod = int(name.split(".")[4]), name.split(".")[6]
        key = f"{layer}_{mod}"
        mine = (adapter.m if "magnitude" in name else adapter.A if ".lora_A." in name else adapter.B)[key].grad / n
        pname = name.replace("base_model.model.", "base_model.model.", 1)
        pname = pname.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight").replace("lora_magnitude_vector", "lora_magnitude_vector.default.weight")
        torch.testing.assert_close(mine, grads[pname], rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked >= 8


def test_qlora_backward_through_int4_base_equals_dense_dequantized(models):
    _, ours = models
    q = copy.deepcopy(ours)
    q.quantize("int4", 32)
    assert all(lin.qweight is not None for lin in q.linears())
    dense = copy.deepcopy(q)
    dense.quantize("none")  # the same int4 values, dequantized
    ids, lengths = _ids(seed=9), torch.tensor([11, 11])
    grads = []
    for model in (q, dense):
        a = _lora(model)
        s, _ = loss_sum(model, a, ids, ids.clone(), lengths)
        s.backward()
        grads.append((s.item(), torch.cat([p.grad.flatten() for p in a.parameters()])))
    assert abs(grads[0][0] - grads[1][0]) < 1e-3 * abs(grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-3, atol=1e-5)
