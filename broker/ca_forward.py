"""The gRPC CertificateAuthority service: each RPC forwarded to kms.ca.<RPC> over NATS.

The CA service (`kmsctl ca serve`) owns the logic and state; the broker adds what only
the ingress can: the caller's authenticated identity (written into `requester`, never
taken from the request), the role check, and error mapping. Handlers are built from the
service descriptor, so a new RPC in ca.proto is exposed without code here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import Message
from nats.aio.client import Client as NATS

from broker.keys import Context, IdentityCache, rpc
from edgekms import natsrpc
from edgekms.identity import Identity
from edgekms.subjects import ca_subject
from edgekms.v1 import ca_pb2

SERVICE = ca_pb2.DESCRIPTOR.services_by_name["CertificateAuthority"]
# Making CA keys in a token or TPM can take seconds; the rest answers quickly.
SLOW_METHODS = {"Init": 120.0}
DEFAULT_TIMEOUT = 10.0


class CAForwarder:
    def __init__(self, nc: NATS, identities: IdentityCache):
        self.nc = nc
        self.identities = identities  # read by the `rpc` wrapper

    def _forward(
        self, method: str, response_type: type[Message]
    ) -> Callable[[Message, Context], Any]:
        async def forward(
            self: CAForwarder, request: Message, context: Context, identity: Identity
        ) -> Message:
            if "requester" in request.DESCRIPTOR.fields_by_name:
                request.requester = identity.client  # type: ignore[attr-defined]
            ceiling = SLOW_METHODS.get(method, DEFAULT_TIMEOUT)
            remaining = context.time_remaining()
            timeout = ceiling if remaining is None else max(0.05, min(ceiling, remaining - 0.05))
            return await natsrpc.request(
                self.nc,
                ca_subject(method),
                request,
                response_type,
                timeout,
                service="the CA service",
                reason_prefix="ca",
            )

        return functools.partial(rpc(method)(forward), self)

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        handlers = {}
        for method in SERVICE.methods:
            request_type = getattr(ca_pb2, method.input_type.name)
            response_type = getattr(ca_pb2, method.output_type.name)
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                self._forward(method.name, response_type),
                request_deserializer=request_type.FromString,
                response_serializer=response_type.SerializeToString,
            )
        return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)
