"""Command line of the trainer. Flag names follow transformers' TrainingArguments and PEFT's LoraConfig
in kebab case, so `--learning-rate`, `--lora-alpha` mean what users expect."""
from __future__ import annotations

import argparse
import logging
import sys

from server.train.config import METHODS, SCHEDULERS, TrainConfig
from server.train.data import TEMPLATES, DataError

EXAMPLE = """example:
  python -m server.train --method lora --data tests/data/json_extract/train.jsonl \\
      --validation-file tests/data/json_extract/valid.jsonl --target-modules all-linear --r 16 \\
      --num-train-epochs 3 --output adapters/json-extract
then serve it: python -m server --adapter-root adapters   (and Generate with adapter_id "json-extract")"""


def _modules(v: str):
    """all-linear, a regex (PEFT fullmatches a string), or a comma-separated list of module names."""
    if v == "all-linear" or any(c in v for c in ".*|()[]\\^$+?"):
        return v
    return [m.strip() for m in v.split(",") if m.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server.train", description=__doc__, epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    S = argparse.SUPPRESS  # unset flags stay out of the namespace: the config knows what the user gave
    g = p.add_argument_group("what to train")
    g.add_argument("--method", required=True, choices=None, help=f"one of {', '.join(METHODS)}")
    g.add_argument("--model", default=S, help="HF model directory or .gguf file (default: the embedded SmolLM2)")
    g.add_argument("--data", required=True, help="training data: JSONL or CSV rows with text, prompt/completion, "
                   "instruction/input/output, chat messages, or prompt/completion as lists of messages")
    g.add_argument("--output", "--output-dir", dest="output", required=True,
                   help="where the PEFT adapter (and checkpoint-N/) go")
    g.add_argument("--validation-file", default=S, help="held-out data in the same formats")
    g.add_argument("--validation-split", type=float, default=S, help="fraction held out when there is no "
                   "validation file (default 0.1)")
    g.add_argument("--template", choices=TEMPLATES, default=S, help="how string prompt/completion and "
                   "instruction/output rows are rendered. auto (default; TRL's rule): prompt/completion as plain text, "
                   "prompt + completion + eos with no chat template (serve the adapter with the raw prompt), "
                   "instruction/output with the alpaca prompt; chat: the chat template, user = prompt, assistant = "
                   "completion (serve with messages); alpaca: ### Instruction / ### Input / ### Response; plain: "
                   "prompt + completion + eos. messages rows and prompt/completion rows of message lists always use "
                   "the chat template, text rows never. The adapter's tessera_training.json records which was used")
    g.add_argument("--max-length", type=int, default=S, help="truncate examples to this many tokens (512)")
    g.add_argument("--train-on-prompt", action="store_true", default=S, help="loss on prompt tokens too "
                   "(default: completion / assistant tokens only)")
    g = p.add_argument_group("LoRA / QLoRA (PEFT LoraConfig)")
    g.add_argument("--r", "--lora-r", dest="r", type=int, default=S, help="rank (8)")
    g.add_argument("--lora-alpha", type=float, default=S, help="alpha; scale = alpha / r (16)")
    g.add_argument("--lora-dropout", type=float, default=S, help="dropout on the LoRA input (0.0)")
    g.add_argument("--target-modules", type=_modules, default=S, help="comma-separated module names, a regex, "
                   "or all-linear (default: PEFT's per-architecture default, q_proj,v_proj for Llama)")
    g.add_argument("--use-rslora", action="store_true", default=S, help="scale = alpha / sqrt(r)")
    g.add_argument("--use-dora", action="store_true", default=S, help="weight-decomposed LoRA (DoRA)")
    g.add_argument("--layers-to-transform", type=int, nargs="+", default=S, help="only these layer indices")
    g.add_argument("--quantize", choices=("int4", "int8", "auto", "none"), default=S,
                   help="qlora's base, exactly as the server's --quantize loads it (int4 for qlora)")
    g.add_argument("--quant-group-size", type=int, default=S, help="int4 group size (128), as the server's")
    g = p.add_argument_group("prefix / prompt tuning (PEFT PrefixTuningConfig / PromptTuningConfig)")
    g.add_argument("--num-virtual-tokens", type=int, default=S, help="virtual tokens (20)")
    g.add_argument("--prefix-projection", action="store_true", default=S,
                   help="prefix: train through the reparameterization MLP (its output is saved)")
    g.add_argument("--encoder-hidden-size", type=int, default=S, help="prefix MLP hidden size (512)")
    g.add_argument("--prompt-tuning-init", choices=("random", "text"), default=S, help="prompt: initialisation")
    g.add_argument("--prompt-tuning-init-text", default=S, help="prompt: the text for --prompt-tuning-init text")
    g = p.add_argument_group("training (transformers TrainingArguments)")
    g.add_argument("--learning-rate", type=float, default=S, help="peak learning rate (lora 2e-4, prefix 1e-2 "
                   "or 1e-3 with --prefix-projection, prompt 3e-2)")
    g.add_argument("--num-train-epochs", type=float, default=S, help="epochs (3)")
    g.add_argument("--max-steps", type=int, default=S, help="optimizer steps; overrides epochs when > 0")
    g.add_argument("--per-device-train-batch-size", type=int, default=S, help="examples per micro-batch (8)")
    g.add_argument("--per-device-eval-batch-size", type=int, default=S, help="examples per eval batch (16)")
    g.add_argument("--gradient-accumulation-steps", type=int, default=S, help="micro-batches per step (1)")
    g.add_argument("--weight-decay", type=float, default=S, help="AdamW weight decay (0.0)")
    g.add_argument("--warmup-ratio", type=float, default=S, help="fraction of steps warming up (0.0)")
    g.add_argument("--warmup-steps", type=int, default=S, help="warm-up steps (overrides the ratio)")
    g.add_argument("--lr-scheduler-type", choices=SCHEDULERS, default=S, help="decay after warm-up (linear)")
    g.add_argument("--max-grad-norm", type=float, default=S, help="gradient clipping, 0 = off (1.0)")
    g.add_argument("--seed", type=int, default=S, help="seed for init, shuffling and dropout (42)")
    g.add_argument("--bf16", action="store_true", default=S, help="bfloat16 base on a GPU")
    g.add_argument("--fp16", action="store_true", default=S, help="float16 base on a GPU")
    g.add_argument("--gradient-checkpointing", action="store_true", default=S,
                   help="recompute layer activations in backward (less memory, slower)")
    g.add_argument("--logging-steps", type=int, default=S, help="log every N steps (10)")
    g.add_argument("--eval-steps", type=int, default=S, help="evaluate every N steps (default: each epoch)")
    g.add_argument("--save-steps", type=int, default=S, help="write output/checkpoint-N every N steps")
    g.add_argument("--resume-from-checkpoint", default=S, help="a checkpoint directory, or 'latest'")
    g.add_argument("--report-to", choices=("auto", "tensorboard", "none"), default=S,
                   help="TensorBoard logs in output/runs (auto: when tensorboard is installed)")
    g.add_argument("--device", default=S, help="auto | cpu | cuda | cuda:N")
    return p


def main(argv: list[str] | None = None) -> None:
    args = vars(parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.errors import ModelLoadError
    from server.train.trainer import train  # torch + model code: after the arguments are known good

    try:
        cfg = TrainConfig(**args, explicit=set(args))
        train(cfg)
    except (ValueError, DataError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
