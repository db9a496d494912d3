"""python -m server.merge against PEFT's merge_and_unload on the real SmolLM2 (real subprocesses, no mocks).

The merged directory must load in transformers and give the logits of PEFT's merged model and of the
unmerged PeftModel; the default base (the embedded Q4_1 GGUF) must give a directory our own loader loads;
adapters without weights to merge are refused by name with exit status 2.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.oracle import hf_smollm2_dir
from tests.peft_adapters import base_model, build

pytestmark = pytest.mark.slow  # the real SmolLM2 and its oracles: minutes, not seconds

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ("The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return",
         "Once upon a time, a small robot")


def run_merge(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.merge", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """name -> the directory `python -m server.merge --model <HF SmolLM2> --adapter <name>` wrote (once)."""
    root = tmp_path_factory.mktemp("merged")
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            out = root / name
            proc = run_merge("--model", hf_smollm2_dir(), "--adapter", build(name), "--output", out)
            assert proc.returncode == 0, proc.stderr
            assert "merging" in proc.stderr or "wrote" in proc.stderr  # it logs what it does
            done[name] = out
        return done[name]

    return get


@pytest.mark.parametrize("name", ["r8-all-linear", "dora-r8", "adalora"])
def test_merged_model_matches_peft(merged, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merged(name)
    # HF names, lm_head left out because SmolLM2 ties it to the embeddings, the base's exact tensor set.
    with safe_open(str(out / "model.safetensors"), "pt") as f, \
            safe_open(str(hf_smollm2_dir() / "model.safetensors"), "pt") as b:
        assert set(f.keys()) == set(b.keys())
        assert "model.layers.29.self_attn.q_proj.weight" in f.keys() and "lm_head.weight" not in f.keys()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True

    tok = AutoTokenizer.from_pretrained(out)
    ids = [tok(t, return_tensors="pt").input_ids for t in TEXTS]
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(base_model(), build(name)).eval()
    with torch.no_grad():
        got = [ours(input_ids=x).logits for x in ids]
        unmerged = [peft(input_ids=x).logits for x in ids]
        with peft.disable_adapter():
            base = [peft(input_ids=x).logits for x in ids]
        reference = peft.merge_and_unload()
        want = [reference(input_ids=x).logits for x in ids]
        ours_state = ours.state_dict()
        for key, value in reference.state_dict().items():  # the merged tensors themselves (lm_head: tied)
            torch.testing.assert_close(ours_state[key], value, atol=1e-6, rtol=0, msg=key)
    for g, w, u, b0 in zip(got, want, unmerged, base):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
        # Merged vs unmerged is fp32 reassociation over 30 layers: PEFT's own merge_and_unload differs from its
        # unmerged model by up to 4e-4 on these logits (|logit| up to ~37), so 1e-4 cannot hold here.
        torch.testing.assert_close(g, u, atol=1e-3, rtol=1e-4)
        assert (g - b0).abs().max() > 0.1  # the adapter does change the model: the comparison means something


def test_default_gguf_base_loads_in_our_loader(merged, tmp_path):
    from loader.base import load_base_model
    from loader.hf_dir import read_config
    from server.model.llama import LlamaModel

    out = tmp_path / "merged"
    proc = run_merge("--adapter", build("r8-all-linear"), "--output", out)  # --model omitted: the embedded GGUF
    assert proc.returncode == 0, proc.stderr
    assert "Q4_1.gguf" in proc.stderr  # it says which base it read

    loaded = load_base_model(str(out))
    assert dataclasses.replace(loaded.config, name="") == dataclasses.replace(read_config(hf_smollm2_dir()), name="")
    LlamaModel(loaded.config, torch.float32, torch.device("cpu")).load_weights(loaded.weights)  # serving layout
    # The GGUF dequantizes to exactly the HF copy's weights, so both merges agree tensor for tensor.
    from_hf = load_base_model(str(merged("r8-all-linear")))
    assert loaded.weights.keys() == from_hf.weights.keys()
    for name, t in loaded.weights.items():
        torch.testing.assert_close(t, from_hf.weights[name], atol=1e-6, rtol=0, msg=name)
    assert loaded.chat_template is not None and loaded.chat_template == from_hf.chat_template
    assert loaded.tokenizer.encode(TEXTS[1]) == from_hf.tokenizer.encode(TEXTS[1])


def test_prompt_tuning_adapter_is_refused(tmp_path):
    adapter = tmp_path / "prompt"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "token_dim": 576}))
    save_file({"prompt_embeddings": torch.zeros(4, 576)}, str(adapter / "adapter_model.safetensors"))
    proc = run_merge("--model", hf_smollm2_dir(), "--adapter", adapter, "--output", tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    assert "PROMPT_TUNING" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_loader_errors_and_help(tmp_path):
    proc = run_merge("--model", hf_smollm2_dir(), "--adapter", tmp_path / "nope", "--output", tmp_path / "out")
    assert proc.returncode == 2 and "no such adapter directory" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_merge("--help")
    assert proc.returncode == 0
    for flag in ("--model", "--adapter", "--output", "--dtype", "--force", "--log-level"):
        assert flag in proc.stdout
