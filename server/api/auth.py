"""Bearer-token checks (`authorization: Bearer <token>`: gRPC metadata, or the HTTP header).

Admin calls need --admin-token (or TESSERA_ADMIN_TOKEN); with none configured they are refused
unless --allow-unauthenticated-admin. Generate (and the HTTP API's /v1 routes) need --api-key when one
is set (the admin token works too). Tokens are compared in constant time.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass

import grpc


class AuthError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def bearer_token(metadata) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            v = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = v.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _matches(given: str | None, expected: str | None) -> bool:
    return given is not None and expected is not None and hmac.compare_digest(given.encode(), expected.encode())


@dataclass(frozen=True)
class Auth:
    admin_token: str | None = None
    api_key: str | None = None
    allow_unauthenticated_admin: bool = False

    def check_admin(self, metadata) -> None:
        if self.admin_token is None:
            if self.allow_unauthenticated_admin:
                return
            raise AuthError(grpc.StatusCode.PERMISSION_DENIED,
                            "admin calls are disabled: start the server with --admin-token (or "
                            "TESSERA_ADMIN_TOKEN), or --allow-unauthenticated-admin on a trusted network")
        token = bearer_token(metadata)
        if token is None:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED,
                            "admin call without credentials: send 'authorization: Bearer <admin token>' "
                            "(gRPC metadata or HTTP header)")
        if not _matches(token, self.admin_token):
            raise AuthError(grpc.StatusCode.PERMISSION_DENIED, "the bearer token is not the admin token")

    def check_client(self, metadata) -> None:
        if self.api_key is None:
            return
        token = bearer_token(metadata)
        if token is None:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED,
                            "this server needs an API key: send 'authorization: Bearer <api key>' (gRPC "
                            "metadata or HTTP header)")
        if not (_matches(token, self.api_key) or _matches(token, self.admin_token)):
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "invalid API key")
