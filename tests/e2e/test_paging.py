"""Paged listing of keys and clients through the broker (issue 12 item 1): on the
session's `kmsctl up` stack, small pages walk the whole list in name order with nothing
twice and nothing left out, and a bad page token or size is a typed refusal."""

from __future__ import annotations

import secrets

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgekms.errors import InvalidArgument
from edgekms.v1 import keys_pb2
from tests.e2e.conftest import KmsStack

pytestmark = pytest.mark.timeout(300)


def test_keys_page_in_name_order(kms_stack: KmsStack) -> None:
    prefix = f"page{secrets.token_hex(3)}/"
    names = [f"{prefix}k{i:02d}" for i in range(12)]
    with kms_stack.client(timeout=60) as client:
        for name in reversed(names):
            client.create_key(name, "ec-p256")
        assert [k.name for k in client.list_keys(prefix, page_size=5)] == names
        assert [k.name for k in client.list_keys(prefix, page_size=12)] == names
        assert [k.name for k in client.list_keys(prefix)] == names
        # One page at a time, as the wire carries it.
        first = client._keys.ListKeys(
            keys_pb2.ListKeysRequest(prefix=prefix, page_size=5), timeout=30
        )
        assert [k.name for k in first.keys] == names[:5] and first.next_page_token
        last = client._keys.ListKeys(
            keys_pb2.ListKeysRequest(prefix=prefix, page_size=7, page_token=first.next_page_token),
            timeout=30,
        )
        assert [k.name for k in last.keys] == names[5:] and not last.next_page_token


@pytest.mark.parametrize(
    ("request_fields", "reason"),
    [
        pytest.param({"page_token": "%%%"}, "list.page_token_invalid", id="token"),
        pytest.param({"page_size": 5000}, "list.page_size_invalid", id="page_size"),
    ],
)
def test_bad_key_page_requests_are_refused(
    kms_stack: KmsStack, request_fields: dict[str, object], reason: str
) -> None:
    with kms_stack.client() as client:
        with pytest.raises(grpc.RpcError) as refused:
            client._keys.ListKeys(
                keys_pb2.ListKeysRequest(**request_fields),  # type: ignore[arg-type]
                timeout=30,
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(InvalidArgument) as typed:
            client._call(
                "ListKeys",
                client._keys.ListKeys,
                keys_pb2.ListKeysRequest(**request_fields),  # type: ignore[arg-type]
                None,
            )
        assert typed.value.reason == reason


def test_clients_page_in_name_order(kms_stack: KmsStack) -> None:
    tag = secrets.token_hex(3)
    added = [f"pg{tag}-{i:02d}" for i in range(7)]
    public = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with kms_stack.client(timeout=60) as client:
        for name in added:
            client.add_client(name, "signer", public_key_der=public)
        everything = [c.name for c in client.list_clients(page_size=1000)]
        assert everything == sorted(everything)
        assert [c.name for c in client.list_clients(page_size=3)] == everything
        assert [n for n in everything if n.startswith(f"pg{tag}-")] == added
