"""Callers beyond Python (issue 14, item 8): the broker answers server reflection as
grpc.reflection.v1 and v1alpha, and what reflection hands out is enough for a generic
client, knowing nothing of EdgeKMS, to call it: here grpcio's own reflection client
builds the messages from the descriptors it fetched and calls WhoAmI and ListKeys, as
grpcurl does (grpcurl is not packaged in Debian 12)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.e2e.conftest import KmsStack

V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


@pytest.fixture
def channel(kms_stack: KmsStack) -> Iterator[grpc.Channel]:
    client = kms_stack.data_dir / "client"
    creds = grpc.ssl_channel_credentials(
        (client / "ca.crt").read_bytes(),
        (client / "admin.key").read_bytes(),
        (client / "admin.crt").read_bytes(),
    )
    with grpc.secure_channel(
        kms_stack.broker, creds, options=[("grpc.ssl_target_name_override", "edgekms-broker")]
    ) as opened:
        yield opened


def test_reflection_v1_lists_services_and_hands_out_descriptors(channel: grpc.Channel) -> None:
    info = channel.stream_stream(
        V1,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    listed, described = info(
        iter(
            [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="edgekms.v1.KeyService"
                ),
            ]
        ),
        timeout=10,
    )
    services = {s.name for s in listed.list_services_response.service}
    assert {
        "edgekms.v1.KeyService",
        "edgekms.v1.SystemService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services
    assert described.file_descriptor_response.file_descriptor_proto


def test_a_generic_client_calls_the_api_from_reflection_alone(channel: grpc.Channel) -> None:
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    system = pool.FindServiceByName("edgekms.v1.SystemService")
    whoami = system.methods_by_name["WhoAmI"]
    request_class = message_factory.GetMessageClass(whoami.input_type)
    response_class = message_factory.GetMessageClass(whoami.output_type)
    call = channel.unary_unary(
        f"/{system.full_name}/{whoami.name}",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    answer = json_format.MessageToDict(call(request_class(), timeout=10))
    assert answer["client"] == "admin" and answer["role"] == "admin"

    keys = pool.FindServiceByName("edgekms.v1.KeyService").methods_by_name["ListKeys"]
    list_request = message_factory.GetMessageClass(keys.input_type)
    list_call = channel.unary_unary(
        "/edgekms.v1.KeyService/ListKeys",
        request_serializer=list_request.SerializeToString,
        response_deserializer=message_factory.GetMessageClass(keys.output_type).FromString,
    )
    # JSON in, as grpcurl -d '{...}' takes it.
    listed = list_call(json_format.Parse('{"prefix": "edgekms/"}', list_request()), timeout=10)
    assert [k.name for k in listed.keys] == ["edgekms/internal-ca"]
