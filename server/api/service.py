"""The `tessera.v1.Inference` gRPC service over the async engine.

Each handler: check draining and credentials -> convert the message -> call the engine -> map its
errors to status codes. A client cancel or deadline cancels the handler task, which closes the
engine stream, which aborts the request and frees its KV blocks at the next step boundary.
"""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from kernels import cpu_ext
from loader.adapter_errors import AdapterLoadError
from proto import tessera_pb2 as pb
from proto import tessera_pb2_grpc as pb_grpc
from server.api.auth import Auth, AuthError
from server.api.convert import to_engine_request, to_response
from server.api.wire import Undecodable
from server.engine.async_engine import AsyncEngine
from server.engine.errors import (AdapterNotFoundError, EngineError, EngineShutdownError, InvalidRequestError,
                                  QueueFullError)
from server.engine.request import FinishReason
from server.metrics import Metrics

log = logging.getLogger("tessera.api")

_STATUS = [  # most specific first
    (AdapterNotFoundError, grpc.StatusCode.NOT_FOUND),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineShutdownError, grpc.StatusCode.UNAVAILABLE),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
]


_ADAPTER_STATUS = {"invalid": grpc.StatusCode.INVALID_ARGUMENT, "unsupported": grpc.StatusCode.INVALID_ARGUMENT,
                   "not_found": grpc.StatusCode.NOT_FOUND, "incompatible": grpc.StatusCode.FAILED_PRECONDITION,
                   "too_large": grpc.StatusCode.FAILED_PRECONDITION, "no_room": grpc.StatusCode.RESOURCE_EXHAUSTED}


def status_for(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, AdapterLoadError):
        return _ADAPTER_STATUS[exc.reason]
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.FAILED_PRECONDITION


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, engine: AsyncEngine, auth: Auth, metrics: Metrics, default_max_new_tokens: int):
        self.engine = engine
        self.auth = auth
        self.metrics = metrics
        self.default_max_new_tokens = default_max_new_tokens
        self.draining = False
        self.active_streams = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def _reject(self, context, code: grpc.StatusCode, message: str):
        self.metrics.rejected.labels(code.name).inc()
        await context.abort(code, message)

    async def _check(self, context, admin: bool, request=None) -> None:
        if isinstance(request, Undecodable):
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, request.message)
        if self.draining:
            await self._reject(context, grpc.StatusCode.UNAVAILABLE, "the server is shutting down: retry elsewhere")
        try:
            (self.auth.check_admin if admin else self.auth.check_client)(context.invocation_metadata())
        except AuthError as exc:
            await self._reject(context, exc.code, str(exc))

    async def wait_idle(self) -> None:
        await self._idle.wait()

    # -- Generate ---------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context):  # noqa: N802
        await self._check(context, admin=False, request=request)
        try:
            req = to_engine_request(request, self.default_max_new_tokens)
        except InvalidRequestError as exc:
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.active_streams += 1
        self._idle.clear()
        stream = self.engine.generate(req)
        last_token_time = None
        finished = False
        try:
            async for out in stream:
                now = time.monotonic()
                if out.token_ids:
                    self.metrics.generation_tokens.inc(len(out.token_ids))
                    if last_token_time is not None:
                        self.metrics.observe_token_gap(now - last_token_time, len(out.token_ids))
                    last_token_time = now
                if out.finished:
                    finished = True
                    self.metrics.observe_finished(out)
                yield to_response(out)
                if out.finish_reason is FinishReason.ERROR:
                    await context.abort(grpc.StatusCode.INTERNAL, out.error or "internal error")
        except (EngineError, AdapterLoadError) as exc:
            finished = True  # refused before admission: counted as rejected, not as a finished request
            await self._reject(context, status_for(exc), str(exc))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # a bug, not the caller's input: say so (never UNKNOWN), keep serving
            finished = True
            log.exception("Generate failed")
            await self._reject(context, grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            # The client went away or its deadline passed: the handler is cancelled, or (when it was
            # suspended at a yield) closed. Either way the request counts once as cancelled.
            if not finished:
                self.metrics.requests.labels(FinishReason.CANCELLED.value).inc()
            await stream.aclose()
            self.active_streams -= 1
            if self.active_streams == 0:
                self._idle.set()

    async def GetModelInfo(self, request, context):  # noqa: N802
        await self._check(context, admin=False, request=request)
        d = self.engine.describe()
        mc = self.engine.model_config
        return pb.GetModelInfoResponse(
            model=d["model"], device=d["device"], dtype=d["dtype"], max_model_len=d["max_model_len"],
            vocab_size=mc.vocab_size, has_chat_template=bool(self.engine.tokenizer.chat_template),
            weight_bytes=d["weight_bytes"], kv_cache_bytes=d["kv_bytes"], quantization=d.get("quantization", "none"),
            cpu_kernels=cpu_ext.status())

    # -- admin ------------------------------------------------------------------------------------
    async def LoadAdapter(self, request, context):  # noqa: N802
        await self._check(context, admin=True, request=request)
        try:
            info = await self.engine.load_adapter(request.adapter_id, request.path or None)
        except (EngineError, AdapterLoadError) as exc:
            await self._reject(context, status_for(exc), str(exc))
        except Exception as exc:
            log.exception("LoadAdapter failed")
            await self._reject(context, grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        return pb.LoadAdapterResponse(adapter=_info(info))

    async def UnloadAdapter(self, request, context):  # noqa: N802
        await self._check(context, admin=True, request=request)
        try:
            self.engine.unload_adapter(request.adapter_id)
        except (EngineError, AdapterLoadError) as exc:
            await self._reject(context, status_for(exc), str(exc))
        return pb.UnloadAdapterResponse()

    async def ListAdapters(self, request, context):  # noqa: N802
        await self._check(context, admin=True, request=request)
        return pb.ListAdaptersResponse(adapters=[_info(i) for i in self.engine.list_adapters()])


def _info(d: dict) -> pb.AdapterInfo:
    return pb.AdapterInfo(adapter_id=d["adapter_id"], kind=d["kind"], rank=d["rank"], resident=d["resident"],
                          path=d["path"], bytes=d["bytes"], active_requests=d["active_requests"], pinned=d["pins"])
