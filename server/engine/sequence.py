"""A Sequence owns one request's state: its tokens, its KV block table, its progress."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from server.engine.request import FinishReason, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter_id: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    # A shared KV prefix (prefix/prompt-tuning adapters): cache tokens ahead of the real ones that
    # have no token ids; real token i sits at position position_offset + i.
    prefix_len: int = 0
    position_offset: int = 0
    task_id: int = 0  # multitask prompt tuning: which task's prompt
    kv_prefix: tuple[str, int] | None = None  # the shared prefix attached to block_table (kv_prefix.py)

    token_ids: list[int] = field(init=False)  # prompt + generated
    num_computed: int = 0  # real tokens whose K/V is in the cache
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    num_preemptions: int = 0
    adapter_pinned: bool = False  # its adapter is pinned in the device pool while it runs
    # Per-request helpers owned by the engine (sampling state, detokenizer, stop matcher).
    sampling_state: Any = None
    detokenizer: Any = None
    stop_matcher: Any = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    @property
    def num_cached_tokens(self) -> int:
        return self.prefix_len + self.num_computed

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return len(self.token_ids) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def reset_for_recompute(self) -> None:
        """After preemption: the cache is gone, prompt + generated tokens are prefilled again."""
        self.num_computed = 0
        self.num_preemptions += 1
        self.status = SequenceStatus.WAITING
