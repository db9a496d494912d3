"""Every error that crosses a layer, in one module that every layer (loader/, server/engine/, server/adapters/,
server/api/) may import; the API layer maps each to one gRPC status and HTTP status (server/api/errors.py).
The reason or kind is set where the error is raised, never recovered from its message."""
from __future__ import annotations


# -- loading ---------------------------------------------------------------------------------------------------
class ModelLoadError(Exception):
    """A base model could not be loaded; the message names the file and the problem."""


# reason -> meaning; the server maps them to INVALID_ARGUMENT / NOT_FOUND / FAILED_PRECONDITION / RESOURCE_EXHAUSTED
# invalid: broken or inconsistent files/config; not_found: missing; incompatible: made for another base;
# too_large: over a server limit (--max-lora-rank); no_room: bigger than the whole pool; unsupported: a kind
# or option this server does not serve.
REASONS = ("invalid", "not_found", "incompatible", "too_large", "no_room", "unsupported")


class AdapterLoadError(Exception):
    def __init__(self, reason: str, message: str):
        if reason not in REASONS:  # a programming error, caught in every test that raises it
            raise ValueError(f"AdapterLoadError reason must be one of {REASONS}, got {reason!r}")
        super().__init__(message)
        self.reason = reason
        # no_room only because requests hold other adapters now: it would fit once they finish
        self.retry_when_idle = False

    def __reduce__(self):  # picklable (Ray Serve sends a replica's errors to its ingress)
        return _adapter_load_error, (self.reason, str(self), self.retry_when_idle)


def _adapter_load_error(reason: str, message: str, retry_when_idle: bool) -> AdapterLoadError:
    e = AdapterLoadError(reason, message)
    e.retry_when_idle = retry_when_idle
    return e


# -- the engine's callers --------------------------------------------------------------------------------------
class EngineError(Exception):
    """Base class for errors a caller can act on."""


class InvalidRequestError(EngineError, ValueError):
    """Bad input: empty prompt, prompt + max_new_tokens over the context, bad sampling values. `param`: the
    request field at fault, when known (the HTTP API's error body names it)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param

    def __reduce__(self):
        return type(self), (str(self), self.param)


class QueueFullError(EngineError):
    """The waiting queue is at --max-queue; retry later."""


class AdapterNotFoundError(EngineError, LookupError):
    """The request names an adapter that is neither loaded nor under the adapter root."""


class EngineShutdownError(EngineError):
    """The engine is draining or stopped and takes no new requests."""
