"""OpenAI's error body, `{"error": {"message", "type", "param", "code"}}`, with the HTTP status of a gRPC code.

Every refusal of the HTTP API goes through `ApiError` (or the handlers in routes.py that turn FastAPI's and
Starlette's own errors into it), so clients see one shape whatever went wrong.
"""
from __future__ import annotations

import grpc
from fastapi.responses import JSONResponse

from server.api.errors import HTTP_STATUS


class ApiError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, param: str | None = None, err_code: str | None = None):
        super().__init__(message)
        self.code = code
        self.param = param
        self.err_code = err_code

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, (500, ""))[0]

    def body(self) -> dict:
        status, kind = HTTP_STATUS.get(self.code, (500, "server_error"))
        return {"error": {"message": str(self), "type": kind, "param": self.param,
                          "code": self.err_code or self.code.name.lower()}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.http_status)
