"""What the gRPC and the HTTP services share over one engine: auth, metrics, the drain and open streams.

`stream(request)` is the one way either API runs a request: it counts the request's tokens, latencies and
finish in the metrics (a stream closed before its end counts once as cancelled) and tracks open streams,
so SIGTERM drains gRPC and HTTP streams alike.
"""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

from server.api.auth import Auth
from server.engine.async_engine import AsyncEngine
from server.engine.request import FinishReason, GenerateRequest, RequestOutput
from server.metrics import Metrics


class Frontend:
    def __init__(self, engine: AsyncEngine, auth: Auth, metrics: Metrics, default_max_new_tokens: int,
                 served_model_name: str):
        self.engine = engine
        self.auth = auth
        self.metrics = metrics
        self.default_max_new_tokens = default_max_new_tokens
        self.served_model_name = served_model_name
        self.draining = False
        self.active_streams = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def stream(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """The engine's stream for one request, counted. Engine and adapter errors raised before admission
        propagate (the caller maps them to a status); closing this stream early aborts the request."""
        self.active_streams += 1
        self._idle.clear()
        gen = self.engine.generate(request)
        last_token_time = None
        finished = False
        try:
            async for out in gen:
                now = time.monotonic()
                if out.token_ids:
                    self.metrics.generation_tokens.inc(len(out.token_ids))
                    if last_token_time is not None:
                        self.metrics.observe_token_gap(now - last_token_time, len(out.token_ids))
                    last_token_time = now
                if out.finished:
                    finished = True
                    self.metrics.observe_finished(out)
                yield out
        except Exception:
            finished = True  # refused before admission (the caller counts it as rejected) or a bug
            raise
        finally:
            # The client went away, its deadline passed or it stopped reading: the request counts once
            # as cancelled, and closing the engine stream aborts it at the next step.
            if not finished:
                self.metrics.requests.labels(FinishReason.CANCELLED.value).inc()
            await gen.aclose()
            self.active_streams -= 1
            if self.active_streams == 0:
                self._idle.set()
