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
    adapter: Any = None  # its AdapterHandle (server/adapters/handle.py), resolved once at admission
    arrival_time: float = field(default_factory=time.monotonic)
    # Virtual tokens (prefix/prompt-tuning adapters): cache positions 0 .. prefix_len - 1 that have no token
    # ids; real token i sits at cache position (and rotary position) prefix_len + i. Their keys/values are
    # written or computed by the step like any other position, and shared through the prefix cache.
    prefix_len: int = 0
    task_id: int = 0  # multitask prompt tuning: which task's prompt
    # Who made this sequence's keys/values besides the base model (the adapter's loaded instance, task):
    # part of every block hash, so no other adapter, and no reload of this one, ever reuses its KV.
    cache_salt: bytes = b""

    token_ids: list[int] = field(init=False)  # prompt + generated
    num_computed: int = 0  # cache positions (virtual ones included) whose K/V is in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks, in order (block_manager.py)
    num_cached_blocks: int = 0  # leading blocks of block_table registered in the prefix cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    num_preemptions: int = 0
    passed_over: int = 0  # steps in which later requests went first while its adapter could not run (scheduler)
    # Per-request helpers owned by the engine (sampling state, detokenizer, stop matcher).
    sampling_state: Any = None
    detokenizer: Any = None
    stop_matcher: Any = None
    grammar: Any = None  # structured output: its GrammarState (server/engine/structured.py), else None

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
    def num_tokens(self) -> int:
        """Cache positions: virtual tokens + prompt + generated."""
        return self.prefix_len + len(self.token_ids)

    @property
    def num_cached_tokens(self) -> int:
        return self.num_computed

    @property
    def num_uncomputed(self) -> int:
        """Positions still to run through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    def cache_tokens(self, start: int, end: int) -> list[int]:
        """What sits at cache positions start .. end - 1: token ids, or -1 - i for virtual token i."""
        v = self.prefix_len
        head = [-1 - i for i in range(start, min(end, v))]
        return head + self.token_ids[max(start, v) - v:end - v] if end > v else head

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def reset_for_recompute(self) -> None:
        """After preemption: the cache is gone, prompt + generated tokens are prefilled again."""
        self.num_computed = 0
        self.num_cached_blocks = 0
        self.num_preemptions += 1
        self.status = SequenceStatus.WAITING
