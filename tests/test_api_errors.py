"""One error mapping for both APIs: each engine/adapter error's gRPC status and the HTTP status OpenAI
clients get for it, in OpenAI's error body."""
import grpc
import pytest

from server.errors import (AdapterLoadError, AdapterNotFoundError, EngineShutdownError,
                           InvalidRequestError, QueueFullError, REASONS)
from server.api.errors import HTTP_STATUS, status_for
from server.api.openai.errors import ApiError


@pytest.mark.parametrize("exc,code,http", [
    (InvalidRequestError("x"), grpc.StatusCode.INVALID_ARGUMENT, 400),
    (AdapterNotFoundError("x"), grpc.StatusCode.NOT_FOUND, 404),
    (QueueFullError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (EngineShutdownError("x"), grpc.StatusCode.UNAVAILABLE, 503),
    (AdapterLoadError("no_room", "x"), grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (AdapterLoadError("incompatible", "x"), grpc.StatusCode.FAILED_PRECONDITION, 400),
    (AdapterLoadError("not_found", "x"), grpc.StatusCode.NOT_FOUND, 404),
])
def test_engine_errors_map_to_one_status_per_api(exc, code, http):
    assert status_for(exc) is code
    err = ApiError(code, str(exc), "model")
    assert err.http_status == http
    body = err.body()["error"]
    assert body == {"message": "x", "type": HTTP_STATUS[code][1], "param": "model", "code": code.name.lower()}


def test_every_adapter_reason_and_auth_code_has_a_4xx():
    for reason in REASONS:
        assert 400 <= HTTP_STATUS[status_for(AdapterLoadError(reason, "x"))][0] < 500
    assert HTTP_STATUS[grpc.StatusCode.UNAUTHENTICATED][0] == 401
    assert HTTP_STATUS[grpc.StatusCode.PERMISSION_DENIED][0] == 403
