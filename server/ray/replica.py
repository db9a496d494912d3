"""One Ray Serve replica: a Tessera engine, with adapters as Ray Serve multiplexed models.

Ray routes a request whose multiplexed model id is an adapter id to a replica that reports holding it
(`@serve.multiplexed`); a replica that does not hold it loads it on demand (from --adapter-root) and Ray
unloads the least recently used one past `max_adapters` (its running requests finish first).
"""
from __future__ import annotations

import logging
import os
import socket

import torch
from ray import serve

from server.config import EngineConfig
from server.engine.async_engine import AsyncEngine
from server.engine.request import GenerateRequest
from server.engine.warmup import warm_up
from server.interpreter import freeze_startup_heap

log = logging.getLogger("tessera.ray")


class _Held:
    """An adapter a replica holds for Ray's multiplexing; dropped from Ray's LRU -> unloaded here."""

    def __init__(self, engine: AsyncEngine, adapter_id: str):
        self.engine, self.adapter_id, self.gone = engine, adapter_id, False

    def __del__(self):  # Ray calls it on eviction (in a thread); the garbage collector may call it again
        if not self.gone:
            self.gone = True
            try:
                self.engine.unload_adapter(self.adapter_id)
                log.info("adapter %s unloaded (evicted from this replica's multiplexed models)", self.adapter_id)
            except Exception:  # already gone
                pass


class TesseraReplica:
    """The deployment class (app.py wraps it in serve.deployment with the sizes and the multiplex limit)."""

    def __init__(self, engine_cfg: dict, threads: int):
        torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS=1 in replicas
        cfg = EngineConfig(**engine_cfg)
        self.engine = AsyncEngine.from_config(cfg)
        warm_up(self.engine.engine)
        ctx = serve.get_replica_context()
        self.name = f"{ctx.replica_id.unique_id}@{socket.gethostname()}:{os.getpid()}"
        self._started = False
        freeze_startup_heap()  # before the replica reports ready: collections never walk what startup built
        log.info("replica %s ready", self.name)

    async def _start(self) -> None:
        if not self._started:
            self._started = True
            await self.engine.start()

    async def hold(self, adapter_id: str) -> _Held:
        await self.engine.load_adapter(adapter_id)
        return _Held(self.engine, adapter_id)

    async def generate(self, request: GenerateRequest):
        """Stream: first this replica's name, then the request's RequestOutputs."""
        await self._start()
        adapter = serve.get_multiplexed_model_id()
        if adapter:
            await self.adapter(adapter)  # makes this replica hold it (Ray then routes its requests here)
        yield self.name
        async for out in self.engine.generate(request):
            yield out

    async def info(self) -> dict:
        """What the ingress needs to serve the HTTP API: the tokenizer (for logprobs), the model's description."""
        await self._start()
        return {"tokenizer": self.engine.tokenizer, "describe": self.engine.describe(),
                "max_model_len": self.engine.max_model_len, "name": self.name}

    async def list_adapters(self) -> list[dict]:
        return self.engine.list_adapters()

    async def load_adapter(self, adapter_id: str, path: str | None = None) -> dict:
        return await self.engine.load_adapter(adapter_id, path)

    async def unload_adapter(self, adapter_id: str) -> int:
        return self.engine.unload_adapter(adapter_id)

    def check_health(self) -> None:  # Ray Serve's health probe
        if self._started and self.engine._thread is not None and not self.engine._thread.is_alive():
            raise RuntimeError("the engine thread died")
