"""What the trainer writes: PEFT-format adapters, and checkpoints it can resume from.

Adapter directory (what PEFT's `PeftModel.from_pretrained` and the server's LoadAdapter read):
    adapter_config.json, adapter_model.safetensors (fp32, metadata {"format": "pt"})
    tessera_training.json   how the training rows were rendered (chat template or plain text), per row form,
                            so a user sees how to prompt the adapter; PEFT and the server ignore it
Checkpoint directory `checkpoint-<step>/` = the adapter files plus, all in safetensors/JSON (nothing
is ever unpickled on resume):
    trainer_params.safetensors   every trainable parameter by name (e.g. the prefix MLP, not only its output)
    optimizer.safetensors        AdamW moments per parameter name
    rng_state.safetensors        torch CPU (and CUDA) generator states
    trainer_state.json           global step, epoch, log history, the config the run used
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loader.adapters.lora import CONFIG_FILE, WEIGHTS_FILE

STATE_FILE = "trainer_state.json"
TRAINING_FILE = "tessera_training.json"


def save_adapter(adapter, out: Path, training: dict | None = None) -> None:
    """training: data.training_format(), written to TRAINING_FILE beside the PEFT files."""
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(adapter.peft_config(), indent=2, sort_keys=True) + "\n")
    save_file(adapter.peft_tensors(), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    if training is not None:
        (out / TRAINING_FILE).write_text(json.dumps(training, indent=2) + "\n")


def save_checkpoint(out: Path, adapter, optimizer: torch.optim.Optimizer, state: dict,
                    training: dict | None = None) -> None:
    save_adapter(adapter, out, training)
    params = {n: p.detach().cpu().contiguous() for n, p in adapter.named_parameters()}
    save_file(params, str(out / "trainer_params.safetensors"))
    names = {id(p): n for n, p in adapter.named_parameters()}
    moments, steps = {}, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if st:
                moments[f"{names[id(p)]}.exp_avg"] = st["exp_avg"].cpu().contiguous()
                moments[f"{names[id(p)]}.exp_avg_sq"] = st["exp_avg_sq"].cpu().contiguous()
                steps[names[id(p)]] = float(st["step"])
    if moments:
        save_file(moments, str(out / "optimizer.safetensors"))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(out / "rng_state.safetensors"))
    (out / STATE_FILE).write_text(json.dumps({**state, "optimizer_steps": steps}, indent=2) + "\n")


def _read(file: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(file), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def load_checkpoint(ckpt: Path, adapter, optimizer: torch.optim.Optimizer) -> dict:
    """Restore parameters, optimizer moments and RNG states in place -> the trainer state dict."""
    missing = [f for f in (STATE_FILE, "trainer_params.safetensors", "rng_state.safetensors") if not (ckpt / f).exists()]
    if missing:
        raise ValueError(f"{ckpt} is not a trainer checkpoint (missing {', '.join(missing)})")
    state = json.loads((ckpt / STATE_FILE).read_text())
    params = _read(ckpt / "trainer_params.safetensors")
    named = dict(adapter.named_parameters())
    if set(params) != set(named):
        raise ValueError(f"{ckpt}: its parameters do not match this run's adapter (another method or config?)")
    with torch.no_grad():
        for n, p in named.items():
            if params[n].shape != p.shape:
                raise ValueError(f"{ckpt}: {n} has shape {tuple(params[n].shape)}, this run {tuple(p.shape)}")
            p.copy_(params[n])
    if (ckpt / "optimizer.safetensors").exists():
        moments = _read(ckpt / "optimizer.safetensors")
        for n, p in named.items():
            if f"{n}.exp_avg" in moments:
                optimizer.state[p] = {"step": torch.tensor(state["optimizer_steps"][n]),
                                      "exp_avg": moments[f"{n}.exp_avg"].to(p.device),
                                      "exp_avg_sq": moments[f"{n}.exp_avg_sq"].to(p.device)}
    rng = _read(ckpt / "rng_state.safetensors")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state


def latest_checkpoint(output: Path) -> Path | None:
    ckpts = sorted(output.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else -1)
    return ckpts[-1] if ckpts else None
