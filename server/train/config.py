"""TrainConfig: every trainer option, checked once (flags a method does not use are errors, not ignored)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from server.config import resolve_device

METHODS = ("lora", "qlora", "prefix", "prompt")
SCHEDULERS = ("linear", "cosine", "constant")
# flags that only make sense for some methods: name -> methods
ONLY_FOR = {
    "r": ("lora", "qlora"), "lora_alpha": ("lora", "qlora"), "lora_dropout": ("lora", "qlora"),
    "target_modules": ("lora", "qlora"), "use_rslora": ("lora", "qlora"), "use_dora": ("lora", "qlora"),
    "layers_to_transform": ("lora", "qlora"),
    "num_virtual_tokens": ("prefix", "prompt"), "prefix_projection": ("prefix",), "encoder_hidden_size": ("prefix",),
    "prompt_tuning_init": ("prompt",), "prompt_tuning_init_text": ("prompt",),
}
DEFAULT_LR = {"lora": 2e-4, "qlora": 2e-4, "prefix": 1e-2, "prompt": 3e-2}


@dataclass
class TrainConfig:
    method: str
    data: str
    output: str
    model: str | None = None  # None = the embedded SmolLM2
    validation_file: str | None = None
    validation_split: float = 0.1  # used when there is no validation file
    template: str = "auto"
    max_length: int = 512
    train_on_prompt: bool = False
    # LoRA (PEFT's LoraConfig names)
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None  # None = PEFT's per-architecture default
    use_rslora: bool = False
    use_dora: bool = False
    layers_to_transform: list[int] | None = None
    # prefix / prompt tuning
    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int = 512
    prompt_tuning_init: str = "random"
    prompt_tuning_init_text: str | None = None
    # quantized base (qlora): the same --quantize the server takes
    quantize: str | None = None  # None: int4 for qlora, none otherwise
    quant_group_size: int = 128
    # TrainingArguments
    learning_rate: float | None = None  # None = DEFAULT_LR[method]
    num_train_epochs: float = 3.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    lr_scheduler_type: str = "linear"
    max_grad_norm: float = 1.0
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    eval_steps: int | None = None  # None = at the end of each epoch
    save_steps: int | None = None  # None = no intermediate checkpoints
    resume_from_checkpoint: str | None = None  # a checkpoint dir, or "latest" under output
    report_to: str = "auto"  # auto (TensorBoard if installed) | tensorboard | none
    device: str = "auto"
    explicit: set[str] = field(default_factory=set, repr=False)  # flags the user gave (for ONLY_FOR checks)

    def __post_init__(self) -> None:
        p = []
        if self.method not in METHODS:
            raise ValueError(f"unknown --method {self.method!r}: choose one of {', '.join(METHODS)}")
        for name, methods in ONLY_FOR.items():
            if name in self.explicit and self.method not in methods:
                p.append(f"--{name.replace('_', '-')} applies to --method {'/'.join(methods)}, not {self.method}")
        if self.quantize is None:
            self.quantize = "int4" if self.method == "qlora" else "none"
        if self.quantize not in ("auto", "none", "int4", "int8"):
            p.append(f"--quantize must be auto, none, int4 or int8, got {self.quantize!r}")
        elif self.method == "qlora" and self.quantize == "none":
            p.append("--method qlora trains on a quantized base: --quantize none contradicts it (use --method lora)")
        elif self.method != "qlora" and self.quantize in ("int4", "int8"):
            p.append(f"--quantize {self.quantize} is QLoRA: use --method qlora")
        if self.learning_rate is None:  # the reparameterization MLP wants a gentler step than a raw prefix
            self.learning_rate = 1e-3 if self.method == "prefix" and self.prefix_projection else DEFAULT_LR[self.method]
        checks = [
            (self.r >= 1, "--r must be >= 1"), (self.lora_alpha > 0, "--lora-alpha must be > 0"),
            (0 <= self.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
            (self.num_virtual_tokens >= 1, "--num-virtual-tokens must be >= 1"),
            (self.prompt_tuning_init in ("random", "text"), "--prompt-tuning-init must be random or text"),
            (self.prompt_tuning_init != "text" or bool(self.prompt_tuning_init_text),
             "--prompt-tuning-init text needs --prompt-tuning-init-text"),
            (self.learning_rate > 0, "--learning-rate must be > 0"),
            (self.num_train_epochs > 0 or self.max_steps > 0, "--num-train-epochs or --max-steps must be positive"),
            (self.per_device_train_batch_size >= 1, "--per-device-train-batch-size must be >= 1"),
            (self.per_device_eval_batch_size >= 1, "--per-device-eval-batch-size must be >= 1"),
            (self.gradient_accumulation_steps >= 1, "--gradient-accumulation-steps must be >= 1"),
            (0 <= self.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)"),
            (self.lr_scheduler_type in SCHEDULERS, f"--lr-scheduler-type must be one of {', '.join(SCHEDULERS)}"),
            (self.max_grad_norm >= 0, "--max-grad-norm must be >= 0"),
            (not (self.bf16 and self.fp16), "--bf16 and --fp16 are exclusive"),
            (self.max_length >= 8, "--max-length must be >= 8"),
            (0 < self.validation_split < 1, "--validation-split must be in (0, 1)"),
            (self.report_to in ("auto", "tensorboard", "none"), "--report-to must be auto, tensorboard or none"),
            (self.eval_steps is None or self.eval_steps >= 1, "--eval-steps must be >= 1"),
            (self.save_steps is None or self.save_steps >= 1, "--save-steps must be >= 1"),
        ]
        p += [msg for ok, msg in checks if not ok]
        if (self.bf16 or self.fp16) and self.torch_device.type != "cuda":
            p.append("--bf16/--fp16 need a GPU (on the CPU the trainer runs in float32)")
        if self.quant_group_size not in (32, 64, 128):
            p.append("--quant-group-size must be 32, 64 or 128")
        if p:
            raise ValueError("; ".join(p))

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("explicit")
        return d
