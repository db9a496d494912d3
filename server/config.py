"""Engine configuration: one dataclass, checked once, passed down."""
from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """"auto" = cuda when available, else cpu; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class EngineConfig:
    model: str | None = None  # HF dir or .gguf file; None = the embedded SmolLM2
    device: str = "auto"  # "auto" = cuda when available, else cpu
    dtype: str = "auto"  # "auto" = float32 on cpu, bfloat16 on cuda
    # bytes of KV cache; with memory_budget, the most the cache's share may grow to (None: 256 MiB / the budget)
    kv_cache_memory: int | None = None
    # bytes shared by the KV cache and the adapter pool, split by the load (S-LoRA's unified paging);
    # None = two fixed pools of kv_cache_memory and adapter_memory
    memory_budget: int | None = None
    block_size: int = 16  # tokens per KV block
    max_num_seqs: int = 64  # running sequences per step
    max_num_batched_tokens: int = 2048  # token budget per step (prefill chunks + decodes), vLLM's online default
    max_queue: int = 256  # waiting requests; more get QueueFullError
    max_model_len: int | None = None  # None = the model's max_position_embeddings
    default_max_new_tokens: int = 256  # used when a request asks for 0
    seed: int = 0
    enable_prefix_caching: bool = True  # reuse computed KV blocks across requests with the same prefix
    quantize: str = "auto"  # auto (GGUF Q4/Q8 stay packed, others dense) | none | int8 | int4
    quant_group_size: int = 128  # int4 groups along the input dimension (32, 64 or 128)
    # adapters
    adapter_root: str | None = None  # directory whose subdirectories are adapters (ids = relative paths)
    # bytes of the device adapter pool; with memory_budget, the most its share may grow to (None: 512 MiB / the budget)
    adapter_memory: int | None = None
    adapter_host_memory: int = 4 << 30  # bytes of adapters kept in host memory (LRU)
    max_lora_rank: int = 64
    lora_dtype: str = "auto"  # dtype of the adapter pool: auto = the model's dtype (bfloat16 halves its bytes)
    max_loras: int = 32  # distinct adapters in one batch
    load_adapters_on_demand: bool = True  # a Generate naming an unloaded id under adapter_root loads it
    adapter_prefetch: bool = True  # copy queued requests' LoRA adapters into the device pool while the batch runs
    adapter_kv_fraction: float = 0.25  # largest share of the KV cache one prompt-learning adapter's virtual tokens may take
    # prompt characters (a prompt, or all message contents together) accepted before tokenizing;
    # None = 32 per token of context (no real prompt that fits the context is that long)
    max_prompt_chars: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            problems.append(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.dtype not in ("auto", *_DTYPES):
            problems.append(f"dtype must be auto, {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.lora_dtype not in ("auto", *_DTYPES):
            problems.append(f"lora_dtype must be auto, {', '.join(_DTYPES)}, got {self.lora_dtype!r}")
        if self.quantize not in ("auto", "none", "int8", "int4"):
            problems.append(f"quantize must be auto, none, int8 or int4, got {self.quantize!r}")
        if self.quant_group_size not in (32, 64, 128):
            problems.append(f"quant_group_size must be 32, 64 or 128, got {self.quant_group_size}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            problems.append(f"block_size must be a power of two, got {self.block_size}")
        for name in ("kv_cache_memory", "memory_budget", "max_num_seqs", "adapter_memory", "max_lora_rank", "max_loras",
                     "max_num_batched_tokens", "max_queue", "default_max_new_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.adapter_kv_fraction <= 1:
            problems.append(f"adapter_kv_fraction must be in (0, 1], got {self.adapter_kv_fraction}")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            problems.append(f"max_prompt_chars must be >= 1, got {self.max_prompt_chars}")
        if self.max_model_len is not None and self.max_model_len < 2:
            problems.append(f"max_model_len must be >= 2, got {self.max_model_len}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def kv_cache_bytes(self) -> int:
        """The KV cache's bytes (with one memory budget: the most its share may take)."""
        return self.kv_cache_memory or self.memory_budget or 256 << 20

    @property
    def adapter_pool_bytes(self) -> int:
        """The device adapter pool's bytes (with one memory budget: the most its share may take)."""
        return self.adapter_memory or self.memory_budget or 512 << 20

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    @property
    def torch_lora_dtype(self) -> torch.dtype:
        return self.torch_dtype if self.lora_dtype == "auto" else _DTYPES[self.lora_dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return _DTYPES[self.dtype]
