"""python -m server.merge: fold a LoRA / DoRA / AdaLoRA adapter into its base model (PEFT's merge_and_unload).

    python -m server.merge --adapter DIR --output DIR [--model PATH] [--dtype float32|bfloat16|float16]

The result is a plain Hugging Face model directory (config.json, model.safetensors, tokenizer) that
transformers' AutoModelForCausalLM and this server's loader both load, and that computes what the base
model with the adapter computes, without the adapter's extra work per token.

Per adapted module, with the adapter read by loader.adapters.lora into its serving form (A [r, in], Bt [r, out],
scale s; AdaLoRA's E already folded into A):
    LoRA / AdaLoRA:  W' = W + s * B A
    DoRA:            W' = g * (W + s * B A),  g = m / ||W + s B A|| per output row
                     (the loader folds g into Bt, so this is g * W + s * Bt.T A)
Biases, norms and embeddings are unchanged. The base is read in fp32 (a GGUF file is dequantized), the
arithmetic is done in fp32, and the result is stored in --dtype.
Only adapters that change linear weights can be merged: prompt/prefix tuning, IA3 and other kinds are
refused by name. Only safetensors are read; pickles are never loaded.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import time
from pathlib import Path

import torch

from loader.adapters.adapter_config import LORA_TYPES, LoraAdapterConfig
from server.errors import AdapterLoadError, ModelLoadError
from loader.config import DTYPES
from loader.adapters.lora import CONFIG_FILE, LoraModule, load_lora_adapter, read_adapter_config, read_safetensors

log = logging.getLogger("tessera.merge")

WEIGHTS_FILE = "model.safetensors"
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_LORA_B = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_B(?:\.weight)?$")
# PEFT kinds that add virtual tokens / a KV prefix instead of changing weights: nothing to merge.
_PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT", "CPT")


class MergeError(Exception):
    """A merge that cannot be done; the message says why."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m server.merge",
        description="Merge a PEFT LoRA-family adapter (LoRA, rsLoRA, DoRA, AdaLoRA) into its base model and write "
                    "the merged model as a Hugging Face directory (config.json, model.safetensors, tokenizer), "
                    "like PEFT's merge_and_unload(). Exit status 2 when the model or adapter cannot be merged.")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="the base model: a Hugging Face model directory or a .gguf file (GGUF weights are "
                        "dequantized). Default: the embedded SmolLM2-135M-Instruct (Q4_1 GGUF)")
    p.add_argument("--adapter", required=True, metavar="DIR",
                   help="the PEFT adapter directory (adapter_config.json + adapter_model.safetensors) with "
                        "peft_type LORA (incl. DoRA / rsLoRA) or ADALORA, made for this base model")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="directory to write the merged model to (created if missing; must be empty unless --force)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="dtype of the written weights (the merge itself is computed in float32). Default: the "
                        "base checkpoint's dtype (float32 for GGUF)")
    p.add_argument("--force", action="store_true",
                   help="write into --output even if it is not empty (files with the same names are replaced)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="logging verbosity (default: INFO)")
    return p


def check_adapter_kind(adapter: Path) -> None:
    """Refuse, by name, adapter kinds that have no weights to merge. Unreadable configs are left to the loader."""
    try:
        d = json.loads((adapter / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return
    if not isinstance(d, dict):
        return
    ptype = str(d.get("peft_type") or "").upper()
    if ptype in LORA_TYPES:
        return
    if not ptype:
        raise MergeError(f"{adapter}: {CONFIG_FILE} has no peft_type; only LoRA-family adapters (peft_type LORA, "
                         "incl. DoRA, or ADALORA) can be merged")
    if ptype in _PROMPT_TYPES:
        why = "it adds virtual tokens / a KV prefix and changes no weight, so there is nothing to merge"
    elif ptype == "IA3":
        why = "IA3 merging is not implemented (only LoRA-family adapters are)"
    else:
        why = "only LoRA-family adapters are merged"
    raise MergeError(f"{adapter}: peft_type {ptype} cannot be merged: {why}. Supported: peft_type LORA (incl. DoRA, "
                     "rsLoRA) and ADALORA")


def _check_output(output: Path, model: Path, adapter: Path, force: bool) -> None:
    out = output.resolve()
    for what, p in (("model", model), ("adapter", adapter)):
        if out == p.resolve():
            raise MergeError(f"--output {output} is the {what} directory itself; choose another directory")
    if output.exists() and not output.is_dir():
        raise MergeError(f"--output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise MergeError(f"--output {output} is not empty (pass --force to write into it anyway)")


def merged_weight(w: torch.Tensor, m: LoraModule, kind: str, lora_b: torch.Tensor | None = None) -> torch.Tensor:
    """W' for one module, with PEFT's order of operations (so that the result matches merge_and_unload's bits
    as closely as possible). w: the base [out, in] weight (fp32); m: the loader's serving form; lora_b: DoRA's
    saved lora_B [out, r] (the serving form has g folded into Bt)."""
    A = m.A.float()
    if kind == "adalora":
        # PEFT: (B @ (A * E)) * lora_alpha / (ranknum + 1e-5); the loader's scale is alpha / (r + 1e-5).
        rank = A.shape[0]
        alpha = m.scale * (rank + 1e-5)
        return w + (m.Bt.t().float() @ A) * alpha / (rank + 1e-5)
    if kind == "dora":
        # PEFT: (m / ||W + s B A||) * (W + s B A); the loader computed g = m / ||W + s B A|| from these weights.
        return m.dora_g.float()[:, None] * (w + (lora_b.float() @ A) * m.scale)
    return w + (m.Bt.t().float() @ A) * m.scale  # PEFT: (B @ A) * scaling


def _raw_lora_b(adapter: Path) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, module) -> the saved lora_B, read by the loader's safetensors-only reader."""
    out = {}
    for key, t in read_safetensors(adapter).items():
        m = _LORA_B.match(key)
        if m:
            out[(int(m.group(1)), m.group(2))] = t
    return out


def _finite(t: torch.Tensor) -> bool:
    """No NaN / inf in t. A sum is much cheaper than isfinite() and propagates both; only when the sum is not
    finite (which a large but finite tensor can also cause) is every element checked."""
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


def merge(model: str | None, adapter: str | Path, output: str | Path, dtype: str | None = None,
          force: bool = False) -> Path:
    """Merge `adapter` into `model` (None: the embedded default) and write an HF directory to `output`."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from loader.base import load_base_model
    from loader.embedded import default_model_path

    t0 = time.monotonic()
    adapter, output = Path(adapter).expanduser(), Path(output).expanduser()
    model_path = Path(default_model_path() if model is None else model).expanduser()
    _check_output(output, model_path, adapter, force)
    # Cheap checks on the adapter before the (possibly long) base model load.
    check_adapter_kind(adapter)
    adapter_cfg = LoraAdapterConfig.from_dict(read_adapter_config(adapter), f"{adapter.name}/{CONFIG_FILE}")

    base = load_base_model(str(model_path), dtype=torch.float32, keep_quantized=False)
    cfg, weights = base.config, base.weights
    out_dtype = dtype or cfg.dtype
    if adapter_cfg.base_model_name_or_path:
        log.info("the adapter was made for %s; merging it into %s", adapter_cfg.base_model_name_or_path, base.source)

    def name_of(layer: int, mod: str) -> str:
        return f"model.layers.{layer}.{_PARENT[mod]}.{mod}.weight"

    lora = load_lora_adapter(adapter.name, adapter, cfg, max_rank=1 << 30,
                             base_weight=lambda layer, mod: weights[name_of(layer, mod)], dtype=torch.float32)
    layers = sorted({layer for layer, _ in lora.modules})
    mods = sorted({mod for _, mod in lora.modules}, key=list(_PARENT).index)
    log.info("adapter %s: %s, rank %d, %d modules (%s) in %d of %d layers", adapter, lora.kind, lora.rank,
             len(lora.modules), ", ".join(mods), len(layers), cfg.num_hidden_layers)

    raw_b = _raw_lora_b(adapter) if lora.kind == "dora" else {}
    with torch.no_grad():
        for layer in tqdm(range(cfg.num_hidden_layers), desc="merging", unit="layer", disable=None):
            for mod in _PARENT:
                m = lora.modules.get((layer, mod))
                if m is None:
                    continue
                name = name_of(layer, mod)
                merged = merged_weight(weights[name].float(), m, lora.kind, raw_b.get((layer, mod)))
                if not _finite(merged):
                    raise MergeError(f"{name}: the merged weight has NaN or infinite values")
                weights[name] = merged

    torch_dtype = getattr(torch, out_dtype)
    state = {}
    for name, t in weights.items():
        t = t.to(torch_dtype) if t.is_floating_point() else t
        if out_dtype == "float16" and t.is_floating_point() and not _finite(t):
            raise MergeError(f"{name} overflows float16; use --dtype bfloat16 or float32")
        state[name] = t.contiguous()

    output.mkdir(parents=True, exist_ok=True)
    hf_config = dataclasses.replace(cfg, dtype=out_dtype).to_hf_dict()
    (output / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    save_file(state, str(output / WEIGHTS_FILE), metadata={"format": "pt"})
    base.tokenizer.save_pretrained(str(output))
    size = (output / WEIGHTS_FILE).stat().st_size
    log.info("wrote %s: %d tensors (%s%s, %.1f MiB) + config.json + tokenizer in %.1fs", output, len(state),
             out_dtype, ", lm_head tied to the embeddings" if cfg.tie_word_embeddings else "", size / 2**20,
             time.monotonic() - t0)
    return output


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        merge(args.model, args.adapter, args.output, args.dtype, args.force)
    except (MergeError, AdapterLoadError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
