"""The Ray Serve ingress: the OpenAI HTTP API and tessera.v1 gRPC `Generate`, over the replicas.

HTTP runs the project's own OpenAI routes (server/api/openai) over a `RemoteEngine`: it streams each request
from a replica chosen by Ray with the adapter id as the multiplexed model id, so the routes, errors, SSE and
validation are the single server's. gRPC arrives through Ray's gRPC proxy with the project's proto. Every
answer names the replica that served it: the `x-tessera-replica` response header, the `tessera-replica`
trailing metadata. The ingress holds no engine and asks for no CPU (Ray would never place it on a machine
whose cores the replicas take).
"""
from __future__ import annotations

import contextvars
import logging

import grpc

from proto import tessera_pb2 as pb
from server.api.auth import Auth, AuthError
from server.api.convert import to_engine_request, to_response
from server.api.errors import status_for
from server.api.frontend import Frontend
from server.api.openai.routes import create_app
from server.engine.request import FinishReason, GenerateRequest
from server.errors import AdapterLoadError, EngineError, InvalidRequestError
from server.metrics import Metrics

log = logging.getLogger("tessera.ray")
REPLICA_HEADER = "x-tessera-replica"
REPLICA_METADATA = "tessera-replica"
_served_by: contextvars.ContextVar[dict | None] = contextvars.ContextVar("tessera_served_by", default=None)

class RemoteEngine:
    """What the OpenAI routes use of an engine, served by the replicas through a Serve handle."""

    def __init__(self, replicas, info: dict):
        self.replicas = replicas
        self.tokenizer = info["tokenizer"]
        self._describe = info["describe"]
        self.max_model_len = info["max_model_len"]

    def describe(self) -> dict:
        return self._describe

    async def generate(self, request: GenerateRequest):
        stream = self.replicas.options(stream=True, multiplexed_model_id=request.adapter_id or "").generate.remote(
            request)
        try:
            replica = await stream.__anext__()
            served = _served_by.get()
            if served is not None:
                served["replica"] = replica
            async for out in stream:
                yield out
        finally:
            stream.cancel()  # the caller left early: the replica's stream closes, which aborts the request

    def list_adapters(self) -> list[dict]:
        return self._adapters

    async def refresh_adapters(self) -> None:
        self._adapters = await self.replicas.list_adapters.remote()

    async def load_adapter(self, adapter_id: str, path: str | None = None) -> dict:
        return await self.replicas.options(multiplexed_model_id=adapter_id).load_adapter.remote(adapter_id, path)

    def unload_adapter(self, adapter_id: str) -> int:
        raise InvalidRequestError("under Ray Serve adapters are unloaded by each replica's LRU "
                                  "(--max-adapters-per-replica)")


class ReplicaHeader:
    """ASGI middleware: the replica RemoteEngine.generate reported goes into the response's headers."""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        served: dict = {}
        token = _served_by.set(served)

        async def send_with_replica(msg):
            if msg["type"] == "http.response.start" and "replica" in served:
                msg = {**msg, "headers": [*msg.get("headers", []),
                                          (REPLICA_HEADER.encode(), served["replica"].encode())]}
            await send(msg)

        try:
            await self.inner(scope, receive, send_with_replica)
        finally:
            _served_by.reset(token)


class Router:
    """The deployment class of the ingress (app.py wraps it with serve.deployment and serve.ingress())."""

    async def __init__(self, replicas, auth: dict, default_max_new_tokens: int, served_model_name: str | None):
        self.replicas = replicas
        self.auth = Auth(**auth)
        self.default_max_new_tokens = default_max_new_tokens
        info = await replicas.info.remote()  # the routes need the model's tokenizer and description
        engine = RemoteEngine(replicas, info)
        await engine.refresh_adapters()
        self.frontend = Frontend(engine, self.auth, Metrics(lambda: None), default_max_new_tokens,
                                 served_model_name or info["describe"]["model"])
        log.info("ingress ready: model %s, first replica %s", info["describe"]["model"], info["name"])

    def __serve_build_asgi_app__(self):  # Ray Serve: this replica's HTTP app, after __init__
        return ReplicaHeader(create_app(self.frontend))

    # -- gRPC (Ray's proxy calls the ingress's method of the rpc's name) ----------------------------------
    async def Generate(self, request: pb.GenerateRequest, grpc_context):  # noqa: N802
        frontend = self.frontend
        try:
            self.auth.check_client(grpc_context.invocation_metadata())
            req = to_engine_request(request, self.default_max_new_tokens)
        except AuthError as exc:
            yield _refused(grpc_context, exc.code, str(exc))
            return
        except InvalidRequestError as exc:
            yield _refused(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        served: dict = {}
        token = _served_by.set(served)
        stream = frontend.stream(req)
        try:
            async for out in stream:
                if out.finished:  # trailing metadata must be set before the last yield
                    grpc_context.set_trailing_metadata([(REPLICA_METADATA, served.get("replica", ""))])
                    if out.finish_reason is FinishReason.ERROR:
                        grpc_context.set_code(grpc.StatusCode.INTERNAL)
                        grpc_context.set_details(out.error or "internal error")
                yield to_response(out)
        except (EngineError, AdapterLoadError) as exc:  # refused before admission
            yield _refused(grpc_context, status_for(exc), str(exc))
        finally:
            _served_by.reset(token)
            await stream.aclose()


def _refused(grpc_context, code: grpc.StatusCode, message: str) -> pb.GenerateResponse:
    """Ray's gRPC proxy sends the status a handler set only along with a message: the refusal is one message
    (finish_reason ERROR, the reason in `error`), then the status code."""
    grpc_context.set_code(code)
    grpc_context.set_details(message)
    return pb.GenerateResponse(finish_reason=pb.ERROR, error=message)
