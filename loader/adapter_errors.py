"""The one error an adapter load raises; `reason` says which gRPC status it maps to."""
from __future__ import annotations

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
