"""The OpenAI-compatible HTTP API over the shared frontend (the same engine, auth and metrics as gRPC).

A request's path: auth and drain checks -> the body (pydantic, protocol.py) -> engine requests
(convert.py) -> every choice admitted (streams.py) -> a JSON response, or SSE chunks ending in
`data: [DONE]`. Every refusal is OpenAI's error body (errors.py) with the HTTP status of the gRPC code
the same refusal gets there.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from importlib import metadata

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.errors import AdapterLoadError, EngineError
from server.api.auth import AuthError
from server.api.errors import status_for
from server.api.frontend import Frontend
from server.api.openai import convert
from server.api.openai.errors import ApiError
from server.api.openai.protocol import ChatCompletionRequest, CompletionRequest, LoadLoraRequest, UnloadLoraRequest
from server.api.openai.streams import Choices, ClientGone, open_streams, until_disconnect
from server.engine.request import FinishReason

log = logging.getLogger("tessera.http")

try:
    VERSION = metadata.version("tessera")
except metadata.PackageNotFoundError:  # run from a checkout without installing
    VERSION = "0.1.0"


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _sse(obj) -> str:
    return f"data: {_dumps(obj)}\n\n"


class _EventStream(StreamingResponse):
    """SSE whose engine streams are closed when the response ends, however it ends (a disconnect included,
    and even before the first chunk)."""

    def __init__(self, chunks, on_close):
        super().__init__(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()


def create_app(frontend: Frontend) -> FastAPI:
    app = FastAPI(title="Tessera", version=VERSION, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible API of the Tessera multi-adapter inference server: the `model` "
                  "field names the base model or an adapter id.")
    engine = frontend.engine
    decode = engine.tokenizer.decode
    started = int(time.time())

    # -- errors ------------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        frontend.metrics.rejected.labels(exc.code.name).inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return await _api_error(request, ApiError(grpc.StatusCode.INVALID_ARGUMENT, "the body is not valid JSON: "
                                                      f"{first.get('ctx', {}).get('error', first.get('msg'))}",
                                                      None, "invalid_json"))
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msgs = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
                         for e in errs[:5])
        return await _api_error(request, ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"invalid request: {msgs}",
                                                  param, "invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: grpc.StatusCode.NOT_FOUND, 405: grpc.StatusCode.INVALID_ARGUMENT,
                413: grpc.StatusCode.RESOURCE_EXHAUSTED}.get(exc.status_code, grpc.StatusCode.INVALID_ARGUMENT)
        err = ApiError(code, str(exc.detail), None, {404: "not_found", 405: "method_not_allowed",
                                                     413: "request_too_large"}.get(exc.status_code))
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return ApiError(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}").response()

    def check(request: Request, admin: bool = False) -> None:
        if frontend.draining:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down: retry elsewhere")
        header = request.headers.get("authorization")
        try:
            (frontend.auth.check_admin if admin else frontend.auth.check_client)(
                [("authorization", header)] if header is not None else [])
        except AuthError as exc:
            raise ApiError(exc.code, str(exc), None, "invalid_api_key" if exc.code.name == "UNAUTHENTICATED"
                           else "forbidden") from None

    def engine_error(exc: Exception, model_param: bool) -> ApiError:
        code = status_for(exc)
        adapter = isinstance(exc, AdapterLoadError) or code is grpc.StatusCode.NOT_FOUND
        param = "model" if (adapter and model_param) else getattr(exc, "param", None)
        return ApiError(code, str(exc), param, "model_not_found" if code is grpc.StatusCode.NOT_FOUND else None)

    def adapter_of(model: str | None) -> str | None:
        return None if model in (None, "", frontend.served_model_name) else model

    # -- generation -------------------------------------------------------------------------------
    async def run(request: Request, body, plan: convert.Plan, chat: bool):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        for i, r in enumerate(plan.requests):
            r.request_id = f"{rid}-{i}"
        streams = [frontend.stream(r) for r in plan.requests]
        try:
            firsts = await until_disconnect(request, open_streams(streams))
        except ClientGone:
            return Response(status_code=499)
        except (EngineError, AdapterLoadError) as exc:
            raise engine_error(exc, True) from None
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": body.model or frontend.served_model_name}
        events = Choices(streams, firsts)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _EventStream(_stream(events, head, plan, body, chat, include_usage), events.aclose)
        try:
            return JSONResponse(await until_disconnect(request, _collect(events, head, plan, body, chat)))
        except ClientGone:
            return Response(status_code=499)
        finally:
            await events.aclose()

    async def _collect(events, head, plan: convert.Plan, body, chat: bool) -> dict:
        n = len(plan.requests)
        texts = [[] for _ in range(n)]
        ids = [[] for _ in range(n)]
        lps = [[] for _ in range(n)]
        fmt = [convert.Logprobs(decode, chat) for _ in range(n)]
        final = [None] * n
        async for i, out in events:
            if out.finish_reason is FinishReason.ERROR:
                raise ApiError(grpc.StatusCode.INTERNAL, out.error or "internal error")
            texts[i].append(out.text)
            ids[i] += out.token_ids
            lps[i].append(fmt[i].format(out))
            if out.finished:
                final[i] = out
        choices = []
        for i in range(n):
            text = "".join(texts[i])
            choice = {"index": i, "logprobs": convert.merge_logprobs(lps[i], chat),
                      "finish_reason": convert.finish_reason(final[i])}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = (plan.echo[i] if plan.echo else "") + text
            if body.return_token_ids:
                choice["token_ids"] = ids[i]
            choices.append(choice)
        head = {**head, "object": "chat.completion" if chat else "text_completion"}
        return {**head, "choices": choices, "usage": _usage(plan, final)}

    def _usage(plan: convert.Plan, final) -> dict:
        prompt = {plan.prompt_index[i]: f.stats.prompt_tokens for i, f in enumerate(final) if f and f.stats}
        done = sum(f.stats.generated_tokens for f in final if f and f.stats)
        return convert.usage(sum(prompt.values()), done)

    async def _stream(events, head, plan: convert.Plan, body, chat: bool, include_usage: bool):
        n = len(plan.requests)
        fmt = [convert.Logprobs(decode, chat) for _ in range(n)]
        final = [None] * n
        extra = {"usage": None} if include_usage else {}
        started_choice = [False] * n
        try:
            async for i, out in events:
                if out.finish_reason is FinishReason.ERROR:
                    err = ApiError(grpc.StatusCode.INTERNAL, out.error or "internal error")
                    yield _sse(err.body())
                    break
                if out.finished:
                    final[i] = out
                text = out.text
                if not started_choice[i]:
                    started_choice[i] = True
                    if chat:  # the role comes first, in a chunk of its own (as OpenAI sends it)
                        yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                         "logprobs": None, "finish_reason": None}], **extra})
                    elif plan.echo:
                        text = plan.echo[i] + text
                if not (text or out.finished or (out.token_ids and (body.return_token_ids or out.logprobs))):
                    continue  # held back (a partial character or a possible stop string): nothing to show yet
                choice = {"index": i, "logprobs": fmt[i].format(out), "finish_reason": convert.finish_reason(out)}
                if chat:
                    choice["delta"] = {"content": text} if text else {}
                else:
                    choice["text"] = text
                if body.return_token_ids:
                    choice["token_ids"] = out.token_ids
                yield _sse({**head, "choices": [choice], **extra})
            else:
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(plan, final)})
            yield "data: [DONE]\n\n"
        except Exception as exc:  # after the 200 went out: the error travels in the stream
            log.exception("stream %s failed", head["id"])
            yield _sse(ApiError(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}").body())
            yield "data: [DONE]\n\n"

    @app.post("/v1/completions", summary="Completions (OpenAI)")
    async def completions(body: CompletionRequest, request: Request):
        check(request)
        plan = convert.completion_plan(body, adapter_of(body.model), frontend.default_max_new_tokens, decode)
        return await run(request, body, plan, chat=False)

    @app.post("/v1/chat/completions", summary="Chat Completions (OpenAI)")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check(request)
        plan = convert.chat_plan(body, adapter_of(body.model), frontend.default_max_new_tokens)
        return await run(request, body, plan, chat=True)

    # -- models and adapters ----------------------------------------------------------------------
    @app.get("/v1/models", summary="The base model and every registered adapter")
    async def models(request: Request):
        check(request)
        base = frontend.served_model_name
        data = [{"id": base, "object": "model", "created": started, "owned_by": "tessera",
                 "root": engine.describe()["source"], "parent": None, "max_model_len": engine.max_model_len}]
        for a in engine.list_adapters():
            data.append({"id": a["adapter_id"], "object": "model", "created": started, "owned_by": "tessera",
                         "root": a["path"], "parent": base, "kind": a["kind"], "resident": a["resident"]})
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter", summary="Load an adapter (vLLM's runtime endpoint; admin token)",
              response_class=PlainTextResponse)
    async def load_lora_adapter(body: LoadLoraRequest, request: Request):
        check(request, admin=True)
        try:
            await engine.load_adapter(body.lora_name, body.lora_path or None)
        except (EngineError, AdapterLoadError) as exc:
            err = engine_error(exc, False)
            err.param = "lora_path" if body.lora_path and err.code is not grpc.StatusCode.RESOURCE_EXHAUSTED \
                else "lora_name"
            raise err from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", summary="Unload an adapter (vLLM's runtime endpoint; admin token)",
              response_class=PlainTextResponse)
    async def unload_lora_adapter(body: UnloadLoraRequest, request: Request):
        check(request, admin=True)
        try:
            engine.unload_adapter(body.lora_name)
        except (EngineError, AdapterLoadError) as exc:
            err = engine_error(exc, False)
            err.param = "lora_name"
            raise err from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    # -- operations -------------------------------------------------------------------------------
    @app.get("/health", summary="200 while serving, 503 while draining")
    async def health():
        if frontend.draining:  # not a refused request: no rejected count
            return ApiError(grpc.StatusCode.UNAVAILABLE, "the server is draining").response()
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": VERSION}

    @app.get("/metrics", summary="Prometheus metrics (classic text format, vLLM's gateway names)")
    def prometheus_metrics():  # a plain def: FastAPI runs it in a worker thread
        return Response(frontend.metrics.render(), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    return app
