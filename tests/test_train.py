"""The trainer end to end on the real SmolLM2 (CPU): a LoRA trained on the shipped demo task halves
its validation loss and, served by the real gRPC server, does the held-out task the base model cannot;
prefix and prompt tuning lower the validation loss and load in PEFT with equal logits; a LoRA trained on
plain-text prompt/completion rows answers the same raw prompt in the engine; a QLoRA adapter
gives the same logits in the int4 server as in the trainer's own forward; resume continues the same
loss curve; bad input fails fast with clear messages."""
from __future__ import annotations

import functools
import json
import logging
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from loader.adapters.lora import WEIGHTS_FILE, read_safetensors
from proto import tessera_pb2 as pb
from server.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.request import GenerateRequest, SamplingParams
from server.engine.scheduler import ScheduledBatch
from server.engine.sequence import Sequence
from server.model.llama import LlamaModel
from server.train import data as D
from server.train.checkpoint import TRAINING_FILE
from server.train.config import TrainConfig
from server.train.trainer import build_adapter, train
from server.train.step import real_token_logits
from tests import smollm2
from tests.oracle import hf_smollm2_dir
from tests.server_proc import ROOT, ServerProcess

pytestmark = pytest.mark.slow  # the real SmolLM2 and its oracles: minutes, not seconds

DEMO = ROOT / "tests" / "data" / "json_extract"
VALID = [json.loads(line) for line in (DEMO / "valid.jsonl").read_text().splitlines() if line.strip()]
# the demo rows are conversational: {"prompt": [user message], "completion": [assistant message]}
PROMPTS = [r["prompt"][0]["content"] for r in VALID]


def _cfg(method: str, out: Path, **kw) -> TrainConfig:
    # 8 held-out rows are enough to see a loss fall (the demo fixture, the README's command, uses all 40)
    args = dict(method=method, data=str(DEMO / "train.jsonl"), validation_file=str(DEMO / "valid8.jsonl"),
                output=str(out), report_to="none", logging_steps=100)
    args.update(kw)
    return TrainConfig(**args, explicit=set(kw))


@pytest.fixture(autouse=True)
def _one_read_of_the_model(monkeypatch):
    """train() in this process reads the model through the session's copy (tests/smollm2.py) instead of parsing
    the GGUF again for every run (about 4 s each); models never modify what they were built from."""
    from server.train import trainer

    monkeypatch.setattr(trainer, "load_base_model", smollm2.loaded)


@pytest.fixture(scope="module")
def base():
    loaded = smollm2.loaded(None, keep_quantized=False)  # the session's copy
    return LlamaModel.from_loaded(loaded, torch.float32, torch.device("cpu"), "none").requires_grad_(False), loaded


def readme_training_command() -> list[str]:
    """The README's demo training command, as written there (its continuation lines joined)."""
    text = (ROOT / "README.md").read_text()
    start = text.index(".venv/bin/python -m server.train --method lora")
    lines = []
    for line in text[start:].splitlines():
        lines.append(line.rstrip().removesuffix("\\").strip())
        if not line.rstrip().endswith("\\"):
            break
    return " ".join(lines).split()


DEMO_STEPS = 8  # of the README command's 25 (one epoch): the validation loss is below a tenth by step 5


@pytest.fixture(scope="module")
def demo_lora(tmp_path_factory):
    """The README's training command on the demo data, as a real process, stopped after DEMO_STEPS steps."""
    out = tmp_path_factory.mktemp("adapters") / "json-extract"
    cmd = readme_training_command()
    assert cmd[:3] == [".venv/bin/python", "-m", "server.train"] and cmd[-2] == "--output", cmd
    cmd = [sys.executable, *cmd[1:-1], str(out), "--max-steps", str(DEMO_STEPS), "--report-to", "none"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trainable params: " in proc.stdout and "trainable%" in proc.stdout
    return out, json.loads((out / "trainer_state.json").read_text())


def test_demo_lora_halves_validation_loss_quickly(demo_lora):
    out, state = demo_lora
    assert state["final_eval_loss"] <= state["first_eval_loss"] / 2, state
    assert state["train_seconds"] < 600
    rows = json.loads((out / TRAINING_FILE).read_text())["rows"]
    assert {k: (v["examples"], v["rendering"]) for k, v in rows.items()} == {
        "conversational prompt/completion": (240, "chat")}  # 200 training + 40 validation rows


DEMO_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                                "city": {"type": "string"}},
               "required": ["name", "age", "city"], "additionalProperties": False}


def _generate(stub, adapter: str, prompt: str, schema: dict | None = None) -> str:
    req = pb.GenerateRequest(adapter_id=adapter, messages=[pb.Message(role="user", content=prompt)], max_new_tokens=40)
    if schema is not None:
        req.structured_output.json_schema = json.dumps(schema)
    return "".join(m.text for m in stub.Generate(req, timeout=600)).strip()


def test_demo_lora_served_over_grpc_does_the_held_out_task(demo_lora, tmp_path):
    """...and with the task's JSON schema as a structured-output constraint (issue 20): every output is valid
    and the held-out exact match is at least as high."""
    import jsonschema

    out, _ = demo_lora
    server = ServerProcess(tmp_path, "--adapter-root", str(out.parent))
    try:
        with ThreadPoolExecutor(16) as pool:
            tuned = list(pool.map(lambda p: _generate(server.stub, out.name, p), PROMPTS))
            plain = list(pool.map(lambda p: _generate(server.stub, "", p), PROMPTS[:20]))  # the base: 20 suffice
            constrained = list(pool.map(lambda p: _generate(server.stub, out.name, p, DEMO_SCHEMA), PROMPTS))
    finally:
        assert server.stop() == 0
    want = [r["completion"][0]["content"] for r in VALID]
    tuned_ok = sum(a == b for a, b in zip(tuned, want))
    plain_ok = sum(a == b for a, b in zip(plain, want))
    assert tuned_ok >= 0.8 * len(VALID), list(zip(tuned, want))[:5]
    assert plain_ok <= 0.25 * len(plain), plain[:5]
    for text in constrained:
        jsonschema.validate(json.loads(text), DEMO_SCHEMA)
    assert sum(a == b for a, b in zip(constrained, want)) >= tuned_ok


def test_demo_lora_loads_in_peft_with_equal_logits(demo_lora, base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = demo_lora
    model, loaded = base
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["base_model_name_or_path"]
    adapter = build_adapter(_cfg("lora", out, target_modules="all-linear", r=16, lora_alpha=32), model,
                            loaded.tokenizer, "x")
    adapter.load_peft_tensors(read_safetensors(out))
    ids = torch.tensor([D.render_prompt(loaded.tokenizer, VALID[0]["prompt"])])
    mine = real_token_logits(model, adapter.eval(), ids)
    hf = AutoModelForCausalLM.from_pretrained(hf_smollm2_dir(), dtype=torch.float32)
    peft = PeftModel.from_pretrained(hf, str(out)).eval()
    with torch.no_grad():
        want = peft(input_ids=ids).logits.float()
    torch.testing.assert_close(mine, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method,kw", [
    ("prefix", dict(num_virtual_tokens=10)),
    ("prefix", dict(num_virtual_tokens=10, prefix_projection=True, encoder_hidden_size=128)),
    ("prompt", dict(num_virtual_tokens=8, prompt_tuning_init="text",
                    prompt_tuning_init_text="Extract name, age and city as JSON")),
], ids=["prefix", "prefix-projection", "prompt-text-init"])
def test_prefix_and_prompt_tuning_lower_loss_and_load_in_peft(method, kw, base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, loaded = base
    result = train(_cfg(method, tmp_path / method, max_steps=6, per_device_train_batch_size=4, **kw))
    assert result["final_eval_loss"] < 0.9 * result["first_eval_loss"], result
    saved = read_safetensors(tmp_path / method)
    mine_adapter = build_adapter(_cfg(method, tmp_path, **{k: v for k, v in kw.items()
                                                           if k not in ("prefix_projection", "encoder_hidden_size")}),
                                 model, loaded.tokenizer, "x")
    mine_adapter.load_peft_tensors(saved)  # a projection's saved form is its output: load it plain
    ids = torch.tensor([D.render_prompt(loaded.tokenizer, VALID[1]["prompt"])])
    mine = real_token_logits(model, mine_adapter.eval(), ids)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_smollm2_dir(), dtype=torch.float32),
                                     str(tmp_path / method)).eval()
    with torch.no_grad():
        want = peft(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -ids.shape[1]:].float()
        peft_tokens = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                    do_sample=False)[0, ids.shape[1]:].tolist()
    # fp32 through 30 layers in another summation order (PEFT's attention over the prefix is SDPA's): logits of
    # magnitude ~20 agree to 5e-4 (a trained prefix's large keys widen the gap beyond 1e-4 on a few elements)
    torch.testing.assert_close(mine, want, rtol=1e-4, atol=5e-4)
    # the server loads the trainer's output unchanged and generates what PEFT generates
    engine = LLMEngine(EngineConfig(adapter_root=str(tmp_path), quantize="none"), loaded)
    engine.adapters.load(method)
    seq = engine.make_sequence(GenerateRequest(prompt_token_ids=ids[0].tolist(), adapter_id=method,
                                               sampling=SamplingParams(max_new_tokens=6)))
    engine.add(seq)
    served = []
    while engine.has_work():
        served += [t for o in engine.step() for t in o.token_ids]
    assert served == peft_tokens


SHOUT_WORDS = ["apple", "river", "candle", "tiger", "pencil", "garden", "rocket", "window",  # trained
               "silver", "dragon", "pillow", "carpet"]                                        # held out


def _shout(word: str) -> dict:
    return {"prompt": f"Shout the word: {word}\n", "completion": f"{word.upper()}!!!"}


def _served_text(engine: LLMEngine, prompt: str, adapter_id: str | None) -> str:
    """Greedy generation for a raw `prompt` (tokenized as the server does: tokenizer(prompt), no chat template)."""
    engine.add(engine.make_sequence(GenerateRequest(prompt=prompt, adapter_id=adapter_id,
                                                    sampling=SamplingParams(max_new_tokens=8))))
    ids = []
    while engine.has_work():
        ids += [t for o in engine.step() for t in o.token_ids]
    return engine.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.slow
def test_plain_prompt_completion_adapter_answers_the_raw_prompt(base, tmp_path, caplog):
    """Issue 16/13: string prompt/completion rows train as plain text (TRL's convention), so the adapter
    answers the same raw prompt sent to the server (trained through the chat template, as before, it answered
    "\nApple is a fruit ..."); the log and tessera_training.json say which rendering was used."""
    _, loaded = base
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(_shout(w)) + "\n" for w in SHOUT_WORDS[:8]))
    (tmp_path / "valid.jsonl").write_text("".join(json.dumps(_shout(w)) + "\n" for w in SHOUT_WORDS[8:]))
    out = tmp_path / "adapters" / "shout"
    with caplog.at_level(logging.INFO, logger="tessera.train"):  # 8 steps of one 8-row batch
        result = train(TrainConfig(method="lora", data=str(tmp_path / "train.jsonl"), output=str(out),
                                   validation_file=str(tmp_path / "valid.jsonl"), target_modules="all-linear",
                                   learning_rate=2e-3, max_steps=8, eval_steps=100, report_to="none",
                                   logging_steps=100))
    assert result["final_eval_loss"] < result["first_eval_loss"] / 2, result
    assert ("prompt/completion rows: plain text, no chat template (TRL's convention): prompt + completion + eos; "
            "serve them with the raw prompt; use --template chat to apply the chat template") in caplog.messages
    recorded = json.loads((out / TRAINING_FILE).read_text())
    assert recorded["template"] == "auto" and recorded["rows"] == {"prompt/completion": {
        "examples": 12, "rendering": "plain", "description": D.describe("prompt/completion", "auto")}}
    engine = LLMEngine(EngineConfig(adapter_root=str(out.parent), quantize="none"), loaded)
    engine.adapters.load("shout")
    prompt = _shout("apple")["prompt"]
    assert _served_text(engine, prompt, "shout") == "APPLE!!!"
    assert _served_text(engine, prompt, None) != "APPLE!!!"  # the base model does not shout


def _served_logits(engine: LLMEngine, adapter_id: str, ids: list[int]) -> torch.Tensor:
    """The serving path's logits for every prompt position (pool, LoraBatch, quantized matmuls)."""
    handle = engine.adapters.acquire(adapter_id)
    assert engine.adapters.make_resident(handle)
    seq = Sequence("probe", ids, SamplingParams(), adapter_id=adapter_id, adapter=handle)
    engine.blocks.grow(seq, len(ids))
    batch = ScheduledBatch()
    batch.seqs.append(seq)
    batch.num_tokens.append(len(ids))
    with torch.inference_mode():
        step = engine.runner._prepare(batch)
        lora = engine.runner._adapter_batch(step.spans, step.input_ids.numel())
        logits = engine.model.logits(engine.model(step.input_ids, step.positions, step.attn, adapters=lora))
    engine.blocks.free(seq)
    engine.adapters.release(handle)
    return logits


def test_qlora_what_was_trained_is_what_is_served(tmp_path):
    out = tmp_path / "adapters" / "qlora"
    cfg = _cfg("qlora", out, max_steps=3, target_modules=["q_proj", "v_proj", "down_proj"], learning_rate=1e-3)
    result = train(cfg)
    assert result["final_eval_loss"] < result["first_eval_loss"]
    loaded = smollm2.loaded()
    trained_on = LlamaModel.from_loaded(loaded, torch.float32, torch.device("cpu"), "int4").requires_grad_(False)
    assert all(lin.qweight is not None and lin.qweight.bits == 4 for lin in trained_on.linears())
    adapter = build_adapter(cfg, trained_on, loaded.tokenizer, "x")
    adapter.load_peft_tensors(read_safetensors(out))
    engine = LLMEngine(EngineConfig(quantize="int4", adapter_root=str(out.parent)), loaded)
    engine.adapters.load("qlora")
    for row in VALID[:3]:
        ids = D.render_prompt(loaded.tokenizer, row["prompt"])
        trainer_view = real_token_logits(trained_on, adapter.eval(), torch.tensor([ids]))[0]
        torch.testing.assert_close(_served_logits(engine, "qlora", ids), trainer_view, rtol=1e-4, atol=2e-4)
    # and PEFT, on the same (dequantized int4) base weights, computes the same logits from the saved adapter
    from peft import PeftModel

    from tests.peft_adapters import base_model_on_weights
    hf = base_model_on_weights(trained_on.linear_weight)
    with torch.no_grad():
        peft = PeftModel.from_pretrained(hf, str(out)).eval()
        want = peft(input_ids=torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(trainer_view, want, rtol=1e-4, atol=2e-4)


def test_resume_continues_the_same_loss_curve(tmp_path):
    kw = dict(max_steps=4, save_steps=2, per_device_train_batch_size=2, lora_dropout=0.1, learning_rate=1e-3,
              eval_steps=100, validation_file=None)  # the training losses are what is compared
    full = train(_cfg("lora", tmp_path / "full", **kw))
    assert (tmp_path / "full" / "checkpoint-2" / "trainer_params.safetensors").exists()
    resumed = train(_cfg("lora", tmp_path / "resumed", resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"),
                         **kw))
    losses = lambda r: [h["loss"] for h in r["log_history"] if "loss" in h]  # noqa: E731
    assert len(losses(full)) == 4 and losses(resumed) == pytest.approx(losses(full), rel=1e-6, abs=1e-7)
    a, b = read_safetensors(tmp_path / "full"), read_safetensors(tmp_path / "resumed")
    assert all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)
    assert WEIGHTS_FILE  # the adapter files are where PEFT expects them


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def _cli_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """The same entry point in this process (no interpreter and torch start per call): exit code and output."""
    from server.train.cli import main

    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_bad_input_fails_fast_with_clear_messages(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\nnot json\n')
    common = ["--data", str(bad), "--output", str(tmp_path / "o")]
    r = _cli("--method", "lora", *common)  # the real process once: its exit code and stderr
    assert r.returncode == 2 and "bad.jsonl:2" in r.stderr and "bad.jsonl:3" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "loaded" not in r.stderr  # failed before loading the model
    here = functools.partial(_cli_here, capsys)  # the rest in this process
    r = here("--method", "ia3", *common)
    assert r.returncode == 2 and "unknown --method 'ia3'" in r.stderr
    r = here("--method", "prefix", "--use-dora", *common)
    assert r.returncode == 2 and "--use-dora applies to --method lora/qlora" in r.stderr
    r = here("--method", "lora", "--quantize", "int4", *common)
    assert r.returncode == 2 and "use --method qlora" in r.stderr
    r = here("--method", "prompt", "--prompt-tuning-init", "text", *common)
    assert r.returncode == 2 and "--prompt-tuning-init-text" in r.stderr
    h = here("--help")
    assert h.returncode == 0
    for flag in ("--learning-rate", "--num-train-epochs", "--max-steps", "--per-device-train-batch-size",
                 "--gradient-accumulation-steps", "--weight-decay", "--warmup-ratio", "--lr-scheduler-type",
                 "--max-grad-norm", "--seed", "--bf16", "--fp16", "--gradient-checkpointing", "--eval-steps",
                 "--save-steps", "--resume-from-checkpoint", "--lora-r", "--lora-alpha", "--lora-dropout",
                 "--target-modules", "--use-rslora", "--use-dora", "--num-virtual-tokens", "--prefix-projection",
                 "--prompt-tuning-init", "--validation-file", "--max-length", "--template"):
        assert flag in h.stdout, flag


def test_torchrun_ddp_two_processes(tmp_path):
    """The same command under torchrun (2 CPU processes, gloo): DDP wraps the adapter, rank 0 saves."""
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "server.train",
                        "--method", "lora", "--data", str(DEMO / "train.jsonl"), "--validation-file",
                        str(DEMO / "valid8.jsonl"), "--max-steps", "1", "--per-device-train-batch-size", "2",
                        "--report-to", "none", "--output", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("trainable params:") == 1  # rank 0 reports
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and state["config"]["method"] == "lora"
    assert (out / WEIGHTS_FILE).exists()
