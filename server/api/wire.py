"""Registers `tessera.v1.Inference` with request parsing that never fails the call with UNKNOWN/INTERNAL.

grpc's generated registration parses each request with `Message.FromString`; bytes that are not a
valid message (bad UTF-8 in a string field, a truncated message) make grpc answer INTERNAL before any
handler runs. Here a parse failure becomes an `Undecodable` the handler turns into INVALID_ARGUMENT.
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from proto import tessera_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Inference"]


@dataclass
class Undecodable:
    type_name: str
    reason: str

    @property
    def message(self) -> str:
        return (f"the request is not a valid {self.type_name} ({self.reason}); string fields must be valid "
                "UTF-8")


def _parser(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError) as exc:
            return Undecodable(cls.DESCRIPTOR.full_name, str(exc))
    return parse


def add_inference_service(servicer, server: grpc.aio.Server) -> None:
    handlers = {}
    for method in SERVICE.methods:
        req = getattr(pb, method.input_type.name)
        resp = getattr(pb, method.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(getattr(servicer, method.name), request_deserializer=_parser(req),
                                     response_serializer=resp.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
