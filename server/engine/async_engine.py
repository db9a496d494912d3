"""The async front end: `async for out in engine.generate(request)`, stepping in a background thread.

Requests and aborts cross into the engine thread through queues; outputs come back to each
caller's asyncio queue. Closing a generate() stream early aborts its request at the next step
boundary, which frees all of its KV blocks.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator

from server.config import EngineConfig
from server.engine.engine import LLMEngine
from server.errors import AdapterLoadError, EngineShutdownError, InvalidRequestError, QueueFullError
from server.engine.request import FinishReason, GenerateRequest, RequestOutput

log = logging.getLogger("tessera.engine")
ADAPTER_WAIT_S = 120.0  # longest a request waits for host memory held by other requests' adapters


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int  # with one memory budget: the most blocks the cache's share may hold
    kv_blocks_used: int
    kv_usage: float  # 0..1
    num_preemptions: int
    adapters_running: dict[str, int]  # adapter id -> running requests
    adapters_waiting: dict[str, int]
    adapter_tiers: dict[str, int]  # "device" / "host" / "disk" -> adapters
    adapter_pool_pages: int
    adapter_pool_pages_used: int
    adapter_prefetches: int  # adapters copied into device pages ahead of their requests (prefetch thread)
    adapter_pool_evictions: int  # adapters evicted from device pages (their host copy stays)
    adapter_kinds: dict[str, int]  # lora / dora / adalora / prefix / prompt / p_tuning / multitask / ia3 / adaption_prompt
    adapter_kv_blocks: int  # cached KV blocks holding prompt-learning adapters' virtual tokens
    kv_blocks_cached: int  # blocks findable in the prefix cache (in use or idle)
    prefix_cache_queries: int  # cache positions looked up at admission
    prefix_cache_hits: int  # of them found cached


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_queue: int | None = None):
        self.engine = engine
        self.max_queue = max_queue if max_queue is not None else engine.cfg.max_queue
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # Sequence | ("abort", id)
        self._num_inbox = 0  # requests handed over but not yet taken by the engine thread
        self._num_admitting = 0  # requests past the queue check, still loading their adapter or tokenizing (loop)
        self._count_lock = threading.Lock()
        self._streams: dict[str, asyncio.Queue] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # tokenizing and chat templating (the tokenizer releases the GIL while it encodes)
        self._prep_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tessera-tokenize")

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> "AsyncEngine":
        return cls(LLMEngine.from_config(cfg))

    # -- what callers see ---------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_config(self):
        return self.engine.model_config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def describe(self) -> dict:
        e = self.engine
        return {"model": e.model_config.name, "source": e.loaded.source, "device": str(e.device),
                "dtype": str(e.dtype).removeprefix("torch."), "weight_bytes": e.weight_bytes,
                "kv_bytes": e.runner.kv_cache_bytes, "kv_blocks": e.blocks.allocator.num_blocks,
                "block_size": e.cfg.block_size, "max_model_len": e.max_model_len,
                "quantization": e.quantization}

    def num_waiting(self) -> int:
        """Queued requests, those still being admitted (adapter load, tokenizing) and those not yet taken by the
        engine thread included: the admission check of every request, so it reads counters and walks nothing
        (stats() walks every adapter entry). Counting the admitting ones bounds a burst: requests that arrive
        together all pass an empty queue's check before any of them is tokenized."""
        return len(self.engine.scheduler.waiting) + self._num_inbox + self._num_admitting

    def stats(self) -> EngineStats:
        s, a, ad = self.engine.scheduler, self.engine.blocks.allocator, self.engine.adapters
        running, waiting = list(s.running), list(s.waiting)  # copies: the engine thread mutates them
        return EngineStats(num_running=len(running), num_waiting=self.num_waiting(),
                           kv_blocks_total=self.engine.kv_max_blocks, kv_blocks_used=a.num_used,
                           kv_usage=a.num_used / max(1, self.engine.kv_max_blocks), num_preemptions=s.num_preemptions,
                           adapters_running=dict(Counter(q.adapter_id for q in running if q.adapter_id)),
                           adapters_waiting=dict(Counter(q.adapter_id for q in waiting if q.adapter_id)),
                           adapter_tiers=dict(ad.tier_counts()), adapter_pool_pages=ad.pool.capacity,
                           adapter_pool_pages_used=ad.pool.num_used,
                           adapter_prefetches=ad.num_prefetched, adapter_pool_evictions=ad.num_evictions,
                           adapter_kinds=dict(ad.kind_counts()),
                           adapter_kv_blocks=len(a.virtual), kv_blocks_cached=a.num_cached,
                           prefix_cache_queries=self.engine.blocks.prefix_queries,
                           prefix_cache_hits=self.engine.blocks.prefix_hits)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="tessera-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._prep_pool.shutdown(wait=False, cancel_futures=True)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        if self._stopping or self._loop is None:
            raise EngineShutdownError("the engine is shutting down" if self._stopping else "the engine is not started")
        if self.num_waiting() >= self.max_queue:
            raise QueueFullError(f"the waiting queue is full ({self.max_queue} requests): retry later")
        self._num_admitting += 1
        try:
            seq = await self._admit(request)
        finally:
            self._num_admitting -= 1
        if seq.request_id in self._streams:
            self.engine.discard(seq)
            raise InvalidRequestError(f"request_id {seq.request_id!r} is already running")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[seq.request_id] = stream
        with self._count_lock:
            self._num_inbox += 1
        self._inbox.put(seq)
        self._wake.set()
        finished = False
        try:
            while True:
                out: RequestOutput = await stream.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(seq.request_id, None)
            if not finished:
                self.abort(seq.request_id)

    async def _admit(self, request: GenerateRequest):
        """Load the request's adapter if it is not in memory (a disk read, in a worker thread: other requests
        keep running) and stage it into free device pages (prefetch), then tokenize. When host memory is full
        of adapters that other requests hold, the request waits for them to finish (up to ADAPTER_WAIT_S)
        instead of failing: an adapter that exists on disk is served however many adapters there are."""
        delay, waited = 0.02, 0.0
        while True:
            try:
                if request.adapter_id and (self.engine.adapter_needs_load(request.adapter_id)
                                           or self.engine.adapter_needs_pages(request.adapter_id)):
                    await asyncio.to_thread(self.engine.load_adapter_for_request, request.adapter_id)
                return await self._prepare(request)
            except AdapterLoadError as exc:
                if not exc.retry_when_idle or waited >= ADAPTER_WAIT_S:
                    raise
            await asyncio.sleep(delay)
            waited += delay
            delay = min(0.5, delay * 2)

    async def _prepare(self, request: GenerateRequest):
        """Tokenize and validate in a worker thread (chat templates and long prompts stay off the event loop).
        A structured-output constraint is compiled first, in the grammar threads: a slow one holds up no one's
        tokenizing, and one past the bound is refused."""
        if request.structured is not None:
            grammars = self.engine.grammars
            compiling = grammars.submit(request.structured)
            try:  # shielded: the compilation is shared (cached) and outlives this request
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(compiling)), grammars.timeout_s)
            except asyncio.TimeoutError:
                raise grammars.timeout_error(request.structured) from None
        fut = self._loop.run_in_executor(self._prep_pool, self.engine.make_sequence, request)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:  # the caller left: give back what the sequence took once it exists
            fut.add_done_callback(lambda f: f.cancelled() or f.exception() or self.engine.discard(f.result()))
            raise

    # -- adapters (admin) ---------------------------------------------------------------------
    async def load_adapter(self, adapter_id: str, path: str | None = None) -> dict:
        return await asyncio.to_thread(self.engine.load_adapter, adapter_id, path)

    def unload_adapter(self, adapter_id: str) -> int:
        return self.engine.unload_adapter(adapter_id)

    def list_adapters(self) -> list[dict]:
        return self.engine.list_adapters()

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    # -- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            outputs = self._drain_inbox()
            if self.engine.has_work():
                try:
                    outputs += self.engine.step()
                except Exception as exc:  # outside any sequence's work (the scheduler): fail the running batch
                    log.exception("engine step failed")
                    outputs += self.engine.fail_running(f"internal error in the engine step: {exc}")
            else:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
            if outputs:
                self._loop.call_soon_threadsafe(self._dispatch, outputs)
        outputs = self.engine.fail_all("the server is shutting down")
        if outputs:
            self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _drain_inbox(self) -> list[RequestOutput]:
        outputs = []
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return outputs
            if isinstance(item, tuple):
                out = self.engine.abort(item[1])
                if out is not None:
                    outputs.append(out)
            else:
                with self._count_lock:
                    self._num_inbox -= 1
                try:
                    self.engine.add(item)
                except ValueError as exc:
                    outputs.append(RequestOutput(item.request_id, "", [], finish_reason=FinishReason.ERROR,
                                                 error=str(exc)))

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)
