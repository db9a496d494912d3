"""The training loop: the served model, frozen, with one trainable adapter; AdamW, warmup + decay,
gradient accumulation and clipping, periodic evaluation and checkpoints, resume, DDP under torchrun.

    load base (quantized like the server for qlora) -> build adapter -> data -> for each optimizer step:
    accumulate token-weighted cross-entropy over micro-batches -> clip -> step -> log / eval / save
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from loader.base import load_base_model, load_tokenizer
from server.model.llama import LlamaModel
from server.train import data as D
from server.train.adapters import TrainableLora, TrainablePrefix, TrainablePrompt
from server.train.checkpoint import latest_checkpoint, load_checkpoint, save_adapter, save_checkpoint
from server.train.config import TrainConfig
from server.train.step import loss_sum

log = logging.getLogger("tessera.train")


class _Objective(torch.nn.Module):
    """model + adapter -> (loss sum, token count): the module DDP wraps (only the adapter has gradients)."""

    def __init__(self, model, adapter, checkpoint: bool):
        super().__init__()
        self.model, self.adapter, self.checkpoint = model, adapter, checkpoint

    def forward(self, ids, labels, lengths):
        return loss_sum(self.model, self.adapter, ids, labels, lengths, self.checkpoint)


def build_adapter(cfg: TrainConfig, model, tokenizer, base_name: str):
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.method in ("lora", "qlora"):
        return TrainableLora(model, r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                             target_modules=cfg.target_modules, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
                             layers_to_transform=cfg.layers_to_transform, base_name=base_name, generator=g)
    if cfg.method == "prefix":
        return TrainablePrefix(model, num_virtual_tokens=cfg.num_virtual_tokens, projection=cfg.prefix_projection,
                               encoder_hidden_size=cfg.encoder_hidden_size, base_name=base_name, generator=g)
    return TrainablePrompt(model, tokenizer, num_virtual_tokens=cfg.num_virtual_tokens, init=cfg.prompt_tuning_init,
                           init_text=cfg.prompt_tuning_init_text, base_name=base_name, generator=g)


def lr_lambda(cfg: TrainConfig, total: int):
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_scheduler_type == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.lr_scheduler_type == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return max(0.0, 1 - progress)

    return f


def load_model(cfg: TrainConfig, device: torch.device):
    """The served model for this run (qlora: quantized exactly as `python -m server --quantize` would)."""
    loaded = load_base_model(cfg.model, keep_quantized=cfg.quantize != "none")
    model = LlamaModel.from_loaded(loaded, cfg.torch_dtype, device, cfg.quantize, cfg.quant_group_size)
    model.requires_grad_(False)
    return model, loaded


@torch.no_grad()
def evaluate(model, adapter, examples: list[D.Example], batch_size: int, pad_id: int, device) -> float:
    """Token-weighted mean cross-entropy over the examples."""
    was = adapter.training
    adapter.eval()
    total, count = 0.0, 0
    for batch in D.batches(examples, batch_size, shuffle=False, seed=0, epoch=0):
        ids, labels, lengths = (t.to(device) for t in D.collate(batch, pad_id))
        s, n = loss_sum(model, adapter, ids, labels, lengths)
        total, count = total + float(s), count + n
    adapter.train(was)
    return total / max(count, 1)


def train(cfg: TrainConfig) -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = cfg.torch_device
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    main = rank == 0
    out = Path(cfg.output)
    torch.manual_seed(cfg.seed)

    tok = load_tokenizer(cfg.model)  # data problems surface before the model is loaded
    examples = D.load_examples(cfg.data, tok, template=cfg.template, max_length=cfg.max_length,
                               train_on_prompt=cfg.train_on_prompt)
    if cfg.validation_file:
        train_ex = examples
        valid_ex = D.load_examples(cfg.validation_file, tok, template=cfg.template, max_length=cfg.max_length,
                                   train_on_prompt=cfg.train_on_prompt)
    else:
        train_ex, valid_ex = D.split_validation(examples, cfg.validation_split, cfg.seed)
    rendered = D.training_format(train_ex + valid_ex, cfg.template, tok, cfg.train_on_prompt)
    if main:  # how each row form is rendered, so nobody has to guess how to prompt the adapter
        for row in rendered["rows"].values():
            log.info("%s", row["description"])
    model, loaded = load_model(cfg, device)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (loaded.config.eos_token_ids or [0])[0]
    base_name = loaded.source if cfg.model is None else cfg.model
    adapter = build_adapter(cfg, model, tok, base_name)
    adapter.train()
    n_train = sum(p.numel() for p in adapter.parameters())
    n_all = n_train + sum(p.numel() for p in model.parameters()) + sum(
        lin.qweight.shape[0] * lin.qweight.shape[1] for lin in model.linears() if lin.qweight is not None)
    if main:
        print(f"trainable params: {n_train:,d} || all params: {n_all:,d} || trainable%: {100 * n_train / n_all:.4f}",
              flush=True)
        log.info("%s on %s (%s base, %s): %d training / %d validation examples", cfg.method, device,
                 cfg.quantize, str(cfg.torch_dtype).removeprefix("torch."), len(train_ex), len(valid_ex))

    objective = _Objective(model, adapter, cfg.gradient_checkpointing)
    runner = torch.nn.parallel.DistributedDataParallel(objective) if world > 1 else objective
    params = [p for p in adapter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    per_epoch = math.ceil(len(D.batches(train_ex, cfg.per_device_train_batch_size, shuffle=False, seed=0, epoch=0,
                                        rank=rank, world_size=world)) / cfg.gradient_accumulation_steps)
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(per_epoch * cfg.num_train_epochs)
    step, history = 0, []
    if cfg.resume_from_checkpoint:
        ckpt = latest_checkpoint(out) if cfg.resume_from_checkpoint == "latest" else Path(cfg.resume_from_checkpoint)
        if ckpt is None:
            raise ValueError(f"--resume-from-checkpoint latest: no checkpoint-* under {out}")
        state = load_checkpoint(ckpt, adapter, optimizer)
        step, history = state["global_step"], state["log_history"]
        if main:
            log.info("resumed from %s at step %d", ckpt, step)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", cfg.learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total), last_epoch=step - 1)
    writer = _tensorboard(cfg, out) if main else None
    bar = tqdm(total=total, initial=step, desc=f"train {cfg.method}", disable=not main, dynamic_ncols=True)
    t0 = time.monotonic()
    first_valid = evaluate(model, adapter, valid_ex, cfg.per_device_eval_batch_size, pad_id, device) \
        if main and step == 0 else None
    if first_valid is not None:
        history.append({"step": 0, "eval_loss": first_valid})
    epoch = step // max(per_epoch, 1)
    while step < total:
        batches = D.batches(train_ex, cfg.per_device_train_batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                            rank=rank, world_size=world)
        groups = [batches[i:i + cfg.gradient_accumulation_steps]
                  for i in range(0, len(batches), cfg.gradient_accumulation_steps)]
        for gi, group in enumerate(groups):
            if epoch * per_epoch + gi < step:
                continue  # resumed: these optimizer steps are done
            loss = _optimizer_step(runner, group, params, optimizer, sched, cfg, pad_id, device)
            step += 1
            lr = sched.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            entry = {"step": step, "epoch": epoch + (gi + 1) / len(groups), "loss": loss, "learning_rate": lr}
            if cfg.eval_steps and step % cfg.eval_steps == 0 or (not cfg.eval_steps and gi == len(groups) - 1) \
                    or step == total:
                entry["eval_loss"] = evaluate(model, adapter, valid_ex, cfg.per_device_eval_batch_size, pad_id, device)
                bar.write(f"step {step}: eval_loss {entry['eval_loss']:.4f}")
            history.append(entry)
            if writer:
                for k in ("loss", "learning_rate", "eval_loss"):
                    if k in entry:
                        writer.add_scalar(f"train/{k}" if k != "eval_loss" else "eval/loss", entry[k], step)
            if main and (step % cfg.logging_steps == 0 or step == total):
                log.info(json.dumps(entry))
            if main and cfg.save_steps and step % cfg.save_steps == 0:
                save_checkpoint(out / f"checkpoint-{step}", adapter, optimizer,
                                {"global_step": step, "log_history": history, "config": cfg.to_dict()}, rendered)
            if step >= total:
                break
        epoch += 1
    bar.close()
    result = {"train_seconds": time.monotonic() - t0, "global_step": step, "log_history": history,
              "first_eval_loss": next((h["eval_loss"] for h in history if h["step"] == 0), None),
              "final_eval_loss": history[-1].get("eval_loss") if history else None}
    if main:
        save_adapter(adapter, out, rendered)
        (out / "trainer_state.json").write_text(json.dumps({**result, "config": cfg.to_dict()}, indent=2) + "\n")
        print(f"saved the {cfg.method} adapter to {out} ({step} steps in {result['train_seconds']:.0f}s, "
              f"eval loss {result['first_eval_loss']} -> {result['final_eval_loss']})", flush=True)
    if writer:
        writer.close()
    if world > 1:
        dist.destroy_process_group()
    return result


def _optimizer_step(runner, group, params, optimizer, sched, cfg, pad_id, device) -> float:
    """One optimizer step over micro-batches: the loss is the mean over all their labelled tokens."""
    tensors = [tuple(t.to(device) for t in D.collate(b, pad_id)) for b in group]
    n_tokens = sum(int((labels[:, 1:] != D.IGNORE).sum()) for _, labels, _ in tensors)
    total = 0.0
    for ids, labels, lengths in tensors:
        s, _ = runner(ids, labels, lengths)
        (s / max(n_tokens, 1)).backward()
        total += float(s.detach())
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    sched.step()
    optimizer.zero_grad(set_to_none=True)
    return total / max(n_tokens, 1)


def _tensorboard(cfg: TrainConfig, out: Path):
    if cfg.report_to == "none":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if cfg.report_to == "tensorboard":
            raise ValueError("--report-to tensorboard: the tensorboard package is not installed") from None
        return None
    return SummaryWriter(str(out / "runs"))
