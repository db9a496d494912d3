"""Errors the engine raises to callers; the gRPC layer maps each to a status code."""


class EngineError(Exception):
    """Base class for errors a caller can act on."""


class InvalidRequestError(EngineError, ValueError):
    """Bad input: empty prompt, prompt + max_new_tokens over the context, bad sampling values."""


class QueueFullError(EngineError):
    """The waiting queue is at --max-queue; retry later."""


class AdapterNotFoundError(EngineError, LookupError):
    """The request names an adapter that is neither loaded nor under the adapter root."""


class EngineShutdownError(EngineError):
    """The engine is draining or stopped and takes no new requests."""
