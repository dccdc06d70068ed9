"""Registering gRPC services so that undecodable requests get a typed answer.

grpc's generated registration parses each request before any handler runs; bytes that
are not the method's protobuf then fail inside grpc as UNKNOWN "Unexpected DecodeError",
without the typed Error clients rely on. Here the parse failure becomes a `Malformed`
marker that the `rpc` wrapper answers with INVALID_ARGUMENT request.malformed, after the
caller is identified and the refusal audited like any other. Streaming methods
(AuditService.TailAudit, KeyService.SignStream) are registered the same way and check for
the marker themselves (SignStream per message: one undecodable message is that item's
error, not the stream's).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message


class Malformed:
    """What a handler receives instead of a request whose bytes did not parse."""

    def __init__(self, expected: str):
        self.expected = expected


def safe_parser(message_type: type[Message]) -> Callable[[bytes], Message | Malformed]:
    def parse(raw: bytes) -> Message | Malformed:
        try:
            return message_type.FromString(raw)
        except DecodeError:
            return Malformed(message_type.__name__)

    return parse


def unary_handlers(
    service: ServiceDescriptor, module: ModuleType, implementation: Callable[[str], Any]
) -> grpc.GenericRpcHandler[Any, Any]:
    """A generic handler for every method of `service` (unary, server-streaming or
    bidirectional); `implementation` gives the callable for a method name, messages come
    from the generated `module`."""
    handlers = {}
    for method in service.methods:
        request_type = getattr(module, method.input_type.name)
        response_type = getattr(module, method.output_type.name)
        if method.client_streaming and not method.server_streaming:
            raise ValueError(f"{method.full_name}: client streaming is not supported here")
        if method.client_streaming:
            make = grpc.stream_stream_rpc_method_handler
        elif method.server_streaming:
            make = grpc.unary_stream_rpc_method_handler
        else:
            make = grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            implementation(method.name),
            request_deserializer=safe_parser(request_type),
            response_serializer=response_type.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def register(
    server: grpc.aio.Server, servicer: object, service: ServiceDescriptor, module: ModuleType
) -> None:
    """Add a servicer whose methods are named as in the service (generated style)."""
    server.add_generic_rpc_handlers(
        (unary_handlers(service, module, lambda name: getattr(servicer, name)),)
    )
