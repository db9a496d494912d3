"""One mapping from the engine's and the adapter loader's errors to a status, shared by both APIs.

gRPC answers with the status code; HTTP with the status OpenAI clients expect for it (`HTTP_STATUS`).
"""
from __future__ import annotations

import grpc

from server.errors import (AdapterLoadError, AdapterNotFoundError, EngineShutdownError,
                           InvalidRequestError, QueueFullError)

_STATUS = [  # most specific first
    (AdapterNotFoundError, grpc.StatusCode.NOT_FOUND),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineShutdownError, grpc.StatusCode.UNAVAILABLE),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
]

_ADAPTER_STATUS = {"invalid": grpc.StatusCode.INVALID_ARGUMENT, "unsupported": grpc.StatusCode.INVALID_ARGUMENT,
                   "not_found": grpc.StatusCode.NOT_FOUND, "incompatible": grpc.StatusCode.FAILED_PRECONDITION,
                   "too_large": grpc.StatusCode.FAILED_PRECONDITION, "no_room": grpc.StatusCode.RESOURCE_EXHAUSTED}

# gRPC code -> (HTTP status, OpenAI error type)
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.INTERNAL: (500, "server_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


def status_for(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, AdapterLoadError):
        return _ADAPTER_STATUS[exc.reason]
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.FAILED_PRECONDITION
