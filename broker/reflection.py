"""Server reflection as `grpc.reflection.v1` and `grpc.reflection.v1alpha`.

grpcio-reflection (1.85) serves only v1alpha, while current tools (grpcurl, Postman,
grpcui, Evans) ask for v1 first. The two are the same messages under another package
name, so the same byte-compatible servicer answers both: v1alpha's messages decode v1's
requests and encode its answers exactly (field numbers and types are identical; see
grpc/reflection/v1/reflection.proto upstream).
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
import grpc.aio
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME


def enable(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serve reflection for `service_names` (and reflection itself) under both names."""
    names = (*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
    servicer = ReflectionServicer(names)
    for service in (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME):
        handler = grpc.method_handlers_generic_handler(
            service,
            {
                "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                    servicer.ServerReflectionInfo,
                    request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                    response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
                )
            },
        )
        server.add_generic_rpc_handlers((handler,))
