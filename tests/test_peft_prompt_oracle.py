"""The PEFT-made prompt-learning / IA3 / LLaMA-Adapter oracle adapters: each is saved with the expected
peft_type and safetensors only, and PEFT's greedy output with it differs from the base model's (so server
tests comparing against it are not vacuous)."""
from __future__ import annotations

import json

import pytest

from tests import peft_prompt_adapters as oracle

pytestmark = pytest.mark.slow  # the real SmolLM2 and its oracles: minutes, not seconds

PROMPT = (504, 1296, 768, 1070, 1495, 563)  # "The three most important things about"
N_NEW = 8
CASES = [("prefix", "PREFIX_TUNING", None), ("prefix-proj", "PREFIX_TUNING", None),
         ("prompt-text", "PROMPT_TUNING", None), ("p-tuning", "P_TUNING", None),
         ("multitask", "MULTITASK_PROMPT_TUNING", 0), ("multitask", "MULTITASK_PROMPT_TUNING", 1),
         ("multitask", "MULTITASK_PROMPT_TUNING", 2), ("ia3", "IA3", None), ("ia3-attn", "IA3", None),
         ("adaption", "ADAPTION_PROMPT", None)]


@pytest.mark.parametrize("name,peft_type,task", CASES, ids=[f"{n}-{t}" if t is not None else n for n, _, t in CASES])
def test_adapter_saved_and_changes_output(name, peft_type, task):
    path = oracle.build(name)
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == peft_type
    assert (path / "adapter_model.safetensors").exists()
    assert not list(path.glob("*.bin"))
    if name == "multitask":
        assert cfg["num_tasks"] == oracle.NUM_TASKS
    got = oracle.peft_greedy(name, PROMPT, N_NEW, task)
    assert len(got) == N_NEW
    assert got != oracle.peft_greedy(None, PROMPT, N_NEW)


def test_multitask_tasks_differ():
    outs = {tuple(oracle.peft_greedy("multitask", PROMPT, N_NEW, t)) for t in range(oracle.NUM_TASKS)}
    assert len(outs) == oracle.NUM_TASKS
