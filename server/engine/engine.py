"""The synchronous engine: admit requests, step the batch, stream outputs.

`step()` reads top to bottom: schedule -> run the model -> sample -> append tokens and check stops.
The async front end (async_engine.py) runs it in a background thread.
"""
from __future__ import annotations

import itertools
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from loader.base import LoadedModel, load_base_model
from server.config import EngineConfig
from server.adapters.admission import AdapterAdmission
from server.adapters.handle import AdapterHandle, instance_salt
from server.adapters.manager import AdapterManager
from server.adapters.prefetch import Prefetcher
from server.engine.block_manager import BlockManager
from server.engine.detokenizer import IncrementalDetokenizer
from server.errors import AdapterNotFoundError, InvalidRequestError
from server.engine.memory import UnifiedMemory
from server.engine.model_runner import ModelRunner
from server.engine.request import FinishReason, GenerateRequest, RequestOutput, RequestStats
from server.engine.sampler import Sampler, SamplingState
from server.engine.scheduler import ScheduledBatch, Scheduler
from server.engine.sequence import Sequence, SequenceStatus
from server.engine.stop import StopStringMatcher
from server.engine.structured import GrammarCompiler
from server.model.llama import LlamaModel

log = logging.getLogger("tessera.engine")
steplog = logging.getLogger("tessera.engine.steps")


class LLMEngine:
    def __init__(self, cfg: EngineConfig, loaded: LoadedModel):
        self.cfg = cfg
        self.loaded = loaded
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.device, self.dtype = cfg.torch_device, cfg.torch_dtype
        mc = loaded.config
        self.max_model_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.max_prompt_chars = cfg.max_prompt_chars or 32 * self.max_model_len
        t0 = time.monotonic()
        self.model = LlamaModel.from_loaded(loaded, self.dtype, self.device, cfg.quantize, cfg.quant_group_size)
        self.quantization = self._describe_quantization()
        log.info("linear layers: %s (%.1f MiB resident, %.2fs to load and convert)", self.quantization,
                 sum(lin.nbytes for lin in self.model.linears()) / 2**20, time.monotonic() - t0)
        strip = cfg.block_size * mc.num_key_value_heads * mc.head_dim  # one block of one layer's keys (or values)
        bytes_per_block = mc.num_hidden_layers * 2 * strip * torch.empty(0, dtype=self.dtype).element_size()
        unified = cfg.memory_budget is not None
        num_blocks = (cfg.memory_budget if unified else cfg.kv_cache_bytes) // bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"{'memory_budget' if unified else 'kv_cache_memory'} "
                             f"{cfg.memory_budget if unified else cfg.kv_cache_bytes} B is below one KV block "
                             f"({bytes_per_block} B)")
        if unified and cfg.torch_lora_dtype != self.dtype:
            raise ValueError(f"memory_budget shares the KV cache's memory with the adapter pool, so lora_dtype must be "
                             f"the model's dtype ({str(self.dtype).removeprefix('torch.')}), got {cfg.lora_dtype}")
        # the most blocks the cache may hold (with one memory budget, its share can shrink below this)
        self.kv_max_blocks = min(num_blocks, cfg.kv_cache_bytes // bytes_per_block) if unified else num_blocks
        self.runner = ModelRunner(self.model, num_blocks, cfg.block_size)
        self.adapters = AdapterManager(self.model, adapter_root=cfg.adapter_root, device_memory=cfg.adapter_pool_bytes,
                                       host_memory=cfg.adapter_host_memory, max_lora_rank=cfg.max_lora_rank,
                                       load_on_demand=cfg.load_adapters_on_demand, lora_dtype=cfg.torch_lora_dtype,
                                       shared=self.runner.kv_cache if unified else None, strip=strip)
        self.runner.attach_pool(self.adapters.pool)
        self.blocks = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.memory = None  # one memory budget: the owner of the split between KV blocks and adapter pages
        if unified:
            self.memory = UnifiedMemory(self.blocks.allocator, self.adapters, mc.num_hidden_layers, strip,
                                        self.kv_max_blocks, reserve=max(1, num_blocks // 20))
            self.blocks.reclaim = self.memory.reclaim
            log.info("one memory budget of %.1f MiB (%d blocks) for the KV cache (up to %d blocks) and the adapter "
                     "pool (up to %d blocks of %d pages), split by the load", num_blocks * bytes_per_block / 2**20,
                     num_blocks, self.kv_max_blocks, self.memory.max_lent, self.memory.pages_per_block)
        # prompt-learning adapters' virtual tokens: at most this share of the KV cache per adapter (refused at load)
        self.adapter_kv_budget = int(self.kv_max_blocks * cfg.adapter_kv_fraction)
        self.adapters.prompt_kv_refusal = self._prompt_kv_refusal
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                   AdapterAdmission(self.adapters, cfg.max_loras))
        # the adapters queued requests wait for go into device pages while the batch runs
        self.prefetcher = Prefetcher(self.adapters, cfg.max_loras) if cfg.adapter_prefetch else None
        self.sampler = Sampler()
        # structured output: constraints compiled for this tokenizer in request threads (structured.py)
        self.grammars = GrammarCompiler(self.tokenizer, mc.vocab_size, mc.eos_token_ids)
        self.eos_ids = set(mc.eos_token_ids)
        self.requests: dict[str, Sequence] = {}
        log.info("model %s on %s/%s ready in %.1fs: %d layers, %.1f MiB weights, %d KV blocks of %d tokens "
                 "(%.1f MiB), prefix caching %s", mc.name, self.device, str(self.dtype).removeprefix("torch."),
                 time.monotonic() - t0, mc.num_hidden_layers, self.weight_bytes / 2**20, num_blocks,
                 cfg.block_size, self.runner.kv_cache_bytes / 2**20, "on" if cfg.enable_prefix_caching else "off")

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> "LLMEngine":
        return cls(cfg, load_base_model(cfg.model, keep_quantized=cfg.quantize != "none"))

    @property
    def weight_bytes(self) -> int:
        return self.model.weight_bytes

    def _describe_quantization(self) -> str:
        kinds = {(f"int{q.bits} g{q.group_size}" if q.group_size != q.shape[1] else f"int{q.bits} per-channel")
                 if (q := lin.qweight) is not None else "dense" for lin in self.model.linears()}
        return ", ".join(sorted(kinds))

    # -- admission ---------------------------------------------------------------------------
    def prompt_ids(self, request: GenerateRequest, adapter: AdapterHandle | None = None) -> list[int]:
        if request.prompt_token_ids is not None:
            bad = [t for t in request.prompt_token_ids if not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise InvalidRequestError(f"prompt_token_ids out of range [0, {self.model_config.vocab_size}): {bad[:5]}")
            return list(request.prompt_token_ids)
        chars = len(request.prompt) if request.prompt is not None else sum(
            len(m["content"]) + len(m["role"]) for m in request.messages)
        if chars > self.max_prompt_chars:
            field = "prompt" if request.prompt is not None else "messages"
            raise InvalidRequestError(f"{field} has {chars} characters; at most {self.max_prompt_chars} are accepted "
                                      f"(--max-prompt-chars; the context is {self.max_model_len} tokens)")
        if request.messages is not None:
            template = (adapter.entry.chat_template if adapter is not None else None) or self.tokenizer.chat_template
            if not template:
                raise InvalidRequestError("this model has no chat template: send a raw prompt instead of messages")
            try:
                text = self.tokenizer.apply_chat_template(request.messages, chat_template=template, tokenize=False,
                                                          add_generation_prompt=True)
            except Exception as exc:  # jinja raises for conversations a template refuses (roles, order)
                raise InvalidRequestError(f"messages: the model's chat template refused them: {exc}") from None
            return self.tokenizer(text, add_special_tokens=False).input_ids
        return self.tokenizer(request.prompt).input_ids

    def make_sequence(self, request: GenerateRequest) -> Sequence:
        """Validate and tokenize a request, resolving its adapter once (safe to call from any thread)."""
        if request.task_id is not None and not request.adapter_id:
            raise InvalidRequestError("task_id needs an adapter_id (a multitask prompt tuning adapter)")
        # raises AdapterNotFoundError; the handle's reference is released when the request ends (discard)
        handle = self.adapters.acquire(request.adapter_id, request.task_id or 0) if request.adapter_id else None
        try:
            return self._make_sequence(request, handle)
        except BaseException:
            if handle is not None:
                self.adapters.release(handle)
            raise

    def _make_sequence(self, request: GenerateRequest, handle: AdapterHandle | None) -> Sequence:
        ids = self.prompt_ids(request, handle)
        if not ids:
            raise InvalidRequestError("the prompt is empty after tokenization")
        p = request.sampling
        if any(t >= self.model_config.vocab_size for t in p.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be below the vocabulary size {self.model_config.vocab_size}")
        if len(ids) + p.max_new_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({p.max_new_tokens}) exceeds the context of "
                f"{self.max_model_len} tokens")
        seq = Sequence(request.request_id or uuid.uuid4().hex, ids, p, adapter_id=request.adapter_id or None,
                       adapter=handle)
        if handle is not None:
            self._place_after_virtual_tokens(seq, request, len(ids) + p.max_new_tokens)
            seq.cache_salt = handle.cache_salt  # its KV is this loaded instance's (and task's) alone
        # progress: the whole request (its adapter's virtual tokens too) must fit in the cache at once
        need = -(-(seq.prefix_len + len(ids) + p.max_new_tokens) // self.cfg.block_size)
        if need > self.kv_max_blocks:
            virtual = f" + {seq.prefix_len} virtual tokens" if seq.prefix_len else ""
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({p.max_new_tokens}){virtual} needs {need} KV blocks "
                f"but the cache has {self.kv_max_blocks}: lower max_new_tokens, shorten the prompt or "
                f"raise --{'memory-budget' if self.memory else 'kv-cache-memory'}")
        seq.sampling_state = SamplingState.create(p, self.device)
        if request.structured is not None:  # compiled here, in the caller's thread (cached per constraint)
            seq.grammar = self.grammars.state(request.structured)
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, ids)
        seq.stop_matcher = StopStringMatcher(p.stop)
        return seq

    def _place_after_virtual_tokens(self, seq: Sequence, request: GenerateRequest, length: int) -> None:
        """Prompt-learning adapters: the request's tokens follow nvt virtual tokens (cache positions 0 .. nvt - 1)."""
        h = seq.adapter
        nvt = h.num_virtual_tokens
        if not nvt:
            if request.task_id is not None:
                raise InvalidRequestError(f"adapter {seq.adapter_id!r} has no tasks: task_id is for multitask "
                                          "prompt tuning adapters")
            return
        if not 0 <= h.task < h.host.num_tasks:
            raise InvalidRequestError(f"adapter {seq.adapter_id!r} has {h.host.num_tasks} task(s): task_id {h.task} "
                                      "is out of range")
        if length + nvt > self.max_model_len:
            raise InvalidRequestError(f"{nvt} virtual tokens + prompt + max_new_tokens exceed the "
                                      f"context of {self.max_model_len} tokens")
        seq.prefix_len = nvt
        seq.task_id = h.task

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            self.discard(seq)
            raise InvalidRequestError(f"request_id {seq.request_id!r} is already running")
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)

    def discard(self, seq: Sequence) -> None:
        """Give back what make_sequence took (its adapter reference), for a sequence that ended or never runs."""
        if seq.adapter is not None:
            self.adapters.release(seq.adapter)

    # -- adapters: admin calls and on-demand loads (any thread; a disk read blocks its caller) -----------
    def adapter_needs_load(self, adapter_id: str) -> bool:
        """A request for this id must first read it from disk (unknown, or dropped from memory)."""
        return self.adapters.needs_load(adapter_id)

    def adapter_needs_pages(self, adapter_id: str) -> bool:
        """A LoRA adapter in host memory but not in the device pool: stage it before queueing its request."""
        return self.prefetcher is not None and self.adapters.needs_pages(adapter_id)

    def load_adapter_for_request(self, adapter_id: str) -> None:
        """On-demand load under --adapter-root (registered adapters dropped to disk reload either way), then (with
        prefetch on) into free device pages, in the caller's worker thread: its request's admission then copies
        nothing in the engine thread."""
        if not self.cfg.load_adapters_on_demand and self.adapters.get(adapter_id) is None:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} is not loaded (on-demand loading is off)")
        entry = self.adapters.load(adapter_id)
        if self.prefetcher is not None:
            self.adapters.prefetch(entry)

    def load_adapter(self, adapter_id: str, path: str | None = None) -> dict:
        """Admin load (from an explicit path, or from --adapter-root) -> its ListAdapters entry."""
        entry = self.adapters.load(adapter_id, Path(path) if path else None)
        return next(i for i in self.adapters.infos() if i["adapter_id"] == entry.adapter_id)

    def unload_adapter(self, adapter_id: str) -> int:
        """Forget an adapter (its running requests finish first) -> how many still use it."""
        return self.adapters.unload(adapter_id)

    def list_adapters(self) -> list[dict]:
        return self.adapters.infos()

    def _prompt_kv_refusal(self, num_virtual_tokens: int) -> str | None:
        """Why an adapter with this many virtual tokens can never be served (None: it fits the budget)."""
        need = -(-num_virtual_tokens // self.cfg.block_size)
        if need <= self.adapter_kv_budget:
            return None
        return (f"needs {need} KV blocks for its {num_virtual_tokens} virtual tokens but --adapter-kv-fraction "
                f"allows {self.adapter_kv_budget} of the {self.kv_max_blocks}-block cache: raise "
                "--adapter-kv-fraction or --kv-cache-memory")

    def _forget_retired_adapters(self) -> None:
        """Cached KV of adapter instances that were unloaded or dropped from memory can never be hit again."""
        for instance in self.adapters.take_retired():
            self.blocks.allocator.forget_salt(instance_salt(instance))

    def reset_prefix_cache(self) -> None:
        """Forget every cached block and the hit counts (blocks in use stay with their sequences)."""
        self._forget_retired_adapters()
        self.blocks.allocator.reset_cache()
        self.blocks.prefix_queries = self.blocks.prefix_hits = 0

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request at once, freeing all its KV blocks. -> its final output, if it was live."""
        seq = self.requests.get(request_id)
        if seq is None:
            return None
        return self._finish(seq, FinishReason.CANCELLED, "", False, [])

    def fail(self, seq: Sequence, message: str) -> RequestOutput:
        """End one request with ERROR (and the reason), freeing what it holds."""
        seq.error = message
        return self._finish(seq, FinishReason.ERROR, "", False, [])

    def fail_all(self, message: str) -> list[RequestOutput]:
        """At shutdown: end every live request with ERROR and free everything."""
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.grammars.close()
        return [self.fail(seq, message) for seq in list(self.requests.values())]

    def fail_running(self, message: str) -> list[RequestOutput]:
        """After a failure outside any one sequence's work: end the running batch, keep the queue."""
        running = list(self.scheduler.running)
        log.error("failing the %d running requests %s: %s", len(running), [s.request_id for s in running], message)
        return [self.fail(seq, message) for seq in running]

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step. A problem of one sequence fails that sequence alone; a forward pass that raises
        is rerun in halves (_execute) so that only the sequences that fail on their own end."""
        if not steplog.isEnabledFor(logging.DEBUG):
            return self._step(None)
        trace = _StepTrace(time.perf_counter())
        outputs = self._step(trace)
        if trace.batch is not None and trace.batch.seqs:
            self._log_step(trace, len(outputs), time.perf_counter())
        return outputs

    def _log_step(self, tr: "_StepTrace", num_outputs: int, end: float) -> None:
        """--log-level DEBUG: one line per step, what ran and where the time went (bench/RESULTS.md reads these)."""
        b = tr.batch
        executed = tr.executed or end
        steplog.debug("step: %d seqs (%d decode) %d tokens, %d adapters, %d waiting, %d outputs: schedule %.1f ms, "
                      "forward %.1f ms, sample %.1f ms, total %.1f ms; pool %d free pages, %d evictions, "
                      "%d prefetched", len(b.seqs), b.num_decodes, b.total_tokens,
                      len({s.adapter_id for s in b.seqs if s.adapter_id}), len(self.scheduler.waiting), num_outputs,
                      (tr.scheduled - tr.start) * 1e3, (executed - tr.scheduled) * 1e3, (end - executed) * 1e3,
                      (end - tr.start) * 1e3, self.adapters.pool.num_free, self.adapters.num_evictions,
                      self.adapters.num_prefetched)

    def _step(self, trace: "_StepTrace | None") -> list[RequestOutput]:
        self._forget_retired_adapters()
        batch = self.scheduler.schedule()
        if self.memory is not None:  # one memory budget: what the cache will not need soon waits in the adapter pool
            self.memory.lend_idle(self._kv_demand())
        if self.prefetcher is not None:
            self.prefetcher.want(self.scheduler.waiting)
        if trace is not None:
            trace.batch, trace.scheduled = batch, time.perf_counter()
        outputs = [self.fail(seq, msg) for seq, msg in batch.failed]
        if not batch.seqs:
            return outputs
        seqs, logits, failed = self._execute(batch)
        if trace is not None:
            trace.executed = time.perf_counter()
        outputs += [self.fail(seq, msg) for seq, msg in failed]
        for seq, n in zip(batch.seqs, batch.num_tokens):
            if not seq.finished:
                seq.num_computed += n
                self.blocks.cache_computed(seq)  # its full blocks can now be shared
        if not seqs:
            return outputs
        try:
            sampled = self.sampler(logits, [s.sampling_state for s in seqs], [s.token_ids for s in seqs],
                                   [s.output_ids for s in seqs], [self._banned(s) for s in seqs],
                                   [s.grammar for s in seqs])
        except Exception as exc:
            log.exception("the sampler failed for requests %s", [s.request_id for s in seqs])
            return outputs + [self.fail(s, f"internal error in the sampler: {type(exc).__name__}: {exc}")
                              for s in seqs]
        now = time.monotonic()
        for i, seq in enumerate(seqs):
            if i in sampled.errors:
                outputs.append(self.fail(seq, sampled.errors[i]))
                continue
            try:
                token = int(sampled.token_ids[i])
                if seq.grammar is not None and not seq.grammar.accept(token):
                    outputs.append(self.fail(seq, f"internal error: the output constraint refused token {token}"))
                    continue
                seq.token_ids.append(token)
                if seq.first_token_time is None:
                    seq.first_token_time = now
                outputs.append(self._after_token(seq, token, *self._logprobs(seq, sampled, i)))
            except Exception as exc:  # stop checks, detokenizing: this sequence's own work
                log.exception("request %s failed after its token", seq.request_id)
                outputs.append(self.fail(seq, f"internal error after sampling: {type(exc).__name__}: {exc}"))
        return outputs

    def _kv_demand(self) -> int:
        """Blocks the running sequences and the next waiting ones may still take (to their max_new_tokens)."""
        bs, seqs = self.cfg.block_size, list(self.scheduler.running)
        seqs += list(itertools.islice(self.scheduler.waiting, max(0, self.cfg.max_num_seqs - len(seqs))))
        return sum(max(0, -(-(s.prefix_len + s.num_prompt_tokens + s.params.max_new_tokens) // bs) - len(s.block_table))
                   for s in seqs)

    def _banned(self, seq: Sequence) -> tuple[int, ...]:
        """Tokens that would end the sequence before its min_tokens: not sampled yet."""
        p = seq.params
        if seq.num_generated >= p.min_tokens:
            return ()
        # a constrained sequence ends when its grammar is complete (the mask then allows only EOS)
        eos = set() if p.ignore_eos or seq.grammar is not None else self.eos_ids
        return tuple(sorted(set(p.stop_token_ids) | eos))

    @staticmethod
    def _logprobs(seq: Sequence, sampled, i: int):
        """-> ([the sampled token's logprob], [[(id, logprob) of the top k]]) as this sequence asked, else Nones."""
        p = seq.params
        if sampled.logprobs is None or not p.logprobs:
            return None, None
        top = None
        if p.top_logprobs:
            top = [list(zip(sampled.top_ids[i, :p.top_logprobs].tolist(),
                            sampled.top_logprobs[i, :p.top_logprobs].tolist()))]
        return [float(sampled.logprobs[i])], top

    def _execute(self, batch: ScheduledBatch):
        """Run the forward pass. If it raises, run each half of the batch again (the same tokens into the
        same cache slots) until the sequences that fail alone are found: only those fail.
        -> (sequences that sample, their logits, [(failed sequence, message)])."""
        try:
            seqs, logits = self.runner.execute(batch)
            return seqs, logits, []
        except Exception as exc:
            ids = [s.request_id for s in batch.seqs]
            if len(batch.seqs) == 1:
                log.exception("the model step failed for request %s", ids[0])
                return [], None, [(batch.seqs[0], f"internal error in the model step: {type(exc).__name__}: {exc}")]
            log.warning("the model step failed for requests %s (%s: %s): retrying in halves to find the cause",
                        ids, type(exc).__name__, exc)
        half = len(batch.seqs) // 2
        seqs, logits, failed = [], [], []
        for part in (slice(0, half), slice(half, None)):
            s, lg, f = self._execute(ScheduledBatch(batch.seqs[part], batch.num_tokens[part]))
            seqs += s
            failed += f
            if s:
                logits.append(lg)
        return seqs, (torch.cat(logits) if logits else None), failed

    def _after_token(self, seq: Sequence, token: int, logprobs: list[float] | None,
                     top: list[list[tuple[int, float]]] | None = None) -> RequestOutput:
        p = seq.params
        lp = (logprobs, top)
        if token in self.eos_ids and (not p.ignore_eos or (seq.grammar is not None and seq.grammar.terminated)):
            return self._finish(seq, FinishReason.EOS, *self._final_text(seq, ""), [token], *lp)
        if token in p.stop_token_ids:
            return self._finish(seq, FinishReason.STOP, *self._final_text(seq, ""), [token], *lp)
        text = seq.detokenizer.step([token])
        if seq.num_generated > p.min_tokens:  # stop strings are looked for after the first min_tokens tokens
            text, stopped = seq.stop_matcher.feed(text)
            if stopped:
                return self._finish(seq, FinishReason.STOP, text, True, [token], *lp)
        if seq.num_generated >= p.max_new_tokens or len(seq.token_ids) >= self.max_model_len:
            return self._finish(seq, FinishReason.LENGTH, *self._final_text(seq, text), [token], *lp)
        return RequestOutput(seq.request_id, text, [token], logprobs, top)

    @staticmethod
    def _final_text(seq: Sequence, text: str) -> tuple[str, bool]:
        """Text so far + whatever the detokenizer and stop matcher still hold; whether a stop matched."""
        tail, stopped = seq.stop_matcher.feed(seq.detokenizer.flush())
        return text + tail + ("" if stopped else seq.stop_matcher.flush()), stopped

    def _finish(self, seq: Sequence, reason: FinishReason, text: str, stopped: bool, token_ids: list[int],
                logprobs: list[float] | None = None, top: list | None = None) -> RequestOutput:
        if stopped:
            reason = FinishReason.STOP
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.scheduler.remove(seq)
        self.requests.pop(seq.request_id, None)
        self.discard(seq)
        now = time.monotonic()
        stats = RequestStats(
            prompt_tokens=seq.num_prompt_tokens, generated_tokens=seq.num_generated,
            queue_time_s=(seq.first_scheduled_time or now) - seq.arrival_time,
            time_to_first_token_s=(seq.first_token_time or now) - seq.arrival_time,
            e2e_latency_s=now - seq.arrival_time)
        return RequestOutput(seq.request_id, text, token_ids, logprobs, top, reason, seq.error, stats)


@dataclass
class _StepTrace:
    """When one step's phases ended (perf_counter seconds), for its DEBUG line."""
    start: float
    batch: ScheduledBatch | None = None
    scheduled: float = 0.0  # scheduled, the memory split and the prefetch list updated
    executed: float | None = None  # the forward pass done
