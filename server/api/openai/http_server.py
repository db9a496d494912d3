"""uvicorn inside the server's own event loop, next to gRPC, on a port bound before the model loads.

The socket is bound at start-up (a taken port fails at once, like gRPC's) but only listens once the
model is loaded and warm, so clients get "connection refused" rather than a hang while it loads.
Signals stay with app.py, which drains gRPC and HTTP streams together and then stops this server.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket

import uvicorn
from starlette.exceptions import HTTPException

log = logging.getLogger("tessera.http")


def bind(host: str, port: int) -> socket.socket:
    """Bind (not listen) host:port, or exit with the reason."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as exc:
        raise SystemExit(f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc} (pick another --http-port, "
                         "or -1 to disable)") from None
    return sock


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # app.py owns SIGTERM/SIGINT: one drain for gRPC and HTTP
        yield


class BodyLimit:
    """ASGI middleware: a request body over max_bytes gets 413 (OpenAI's error body) before it is parsed."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:  # routes.py turns it into OpenAI's error body
                    raise HTTPException(413, self._message())
            return msg

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"the request body is over {self.max_bytes} bytes (--max-message-bytes)"

    async def _refuse(self, send):
        body = json.dumps({"error": {"message": self._message(), "type": "invalid_request_error", "param": None,
                                     "code": "request_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class HttpServer:
    def __init__(self, app, sock: socket.socket, max_body_bytes: int):
        self.sock = sock
        config = uvicorn.Config(BodyLimit(app, max_body_bytes), lifespan="off", log_config=None, access_log=False,
                                http="httptools", ws="none", timeout_graceful_shutdown=2, server_header=False)
        self.server = _Uvicorn(config)
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.task = asyncio.ensure_future(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises what stopped it
                raise SystemExit("the HTTP server stopped during start-up")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self.task is None:
            return
        self.server.should_exit = True
        try:
            await asyncio.wait_for(self.task, timeout=10)
        except asyncio.TimeoutError:
            log.warning("the HTTP server did not stop in 10 s")
