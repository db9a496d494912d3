"""The `tessera.v1.Inference` gRPC service over the async engine.

Each handler: check draining and credentials -> convert the message -> call the engine -> map its
errors to status codes. A client cancel or deadline cancels the handler task, which closes the
engine stream, which aborts the request and frees its KV blocks at the next step boundary.
"""
from __future__ import annotations

import logging

import grpc

from kernels import cpu_ext
from server.errors import AdapterLoadError, EngineError, InvalidRequestError
from proto import tessera_pb2 as pb
from proto import tessera_pb2_grpc as pb_grpc
from server.api.auth import AuthError
from server.api.convert import to_engine_request, to_response
from server.api.errors import status_for
from server.api.frontend import Frontend
from server.api.wire import Undecodable
from server.engine.request import FinishReason

log = logging.getLogger("tessera.api")


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, frontend: Frontend):
        self.frontend = frontend
        self.engine = frontend.engine
        self.metrics = frontend.metrics

    async def _reject(self, context, code: grpc.StatusCode, message: str):
        self.metrics.rejected.labels(code.name).inc()
        await context.abort(code, message)

    async def _check(self, context, admin: bool, request=None) -> None:
        if isinstance(request, Undecodable):
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, request.message)
        if self.frontend.draining:
            await self._reject(context, grpc.StatusCode.UNAVAILABLE, "the server is shutting down: retry elsewhere")
        auth = self.frontend.auth
        try:
            (auth.check_admin if admin else auth.check_client)(context.invocation_metadata())
        except AuthError as exc:
            await self._reject(context, exc.code, str(exc))

    # -- Generate ---------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context):  # noqa: N802
        await self._check(context, admin=False, request=request)
        try:
            req = to_engine_request(request, self.frontend.default_max_new_tokens)
        except InvalidRequestError as exc:
            await self._reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        stream = self.frontend.stream(req)
        try:
            async for out in stream:
                yield to_response(out)
                if out.finish_reason is FinishReason.ERROR:
                    await context.abort(grpc.StatusCode.INTERNAL, out.error or "internal error")
        except (EngineError, AdapterLoadError) as exc:  # refused before admission
            await self._reject(context, status_for(exc), str(exc))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # a bug, not the caller's input: say so (never UNKNOWN), keep serving
            log.exception("Generate failed")
            await self._reject(context, grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            await stream.aclose()

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
