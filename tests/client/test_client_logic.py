"""KMSClient's pure parts: name resolution, what goes on the wire, rebuilding errors."""

from __future__ import annotations

import hashlib

import grpc
import pytest

from edgekms import errors
from edgekms.algorithms import ALGORITHM_BY_CLI
from edgekms.v1 import common_pb2 as pb
from mgmt.client import error_from_rpc, prepare_data, resolve_algorithm, resolve_key_type


def test_key_type_by_cli_name_or_enum() -> None:
    assert resolve_key_type("ec-p256") == pb.KEY_TYPE_EC_P256
    assert resolve_key_type("RSA-4096") == pb.KEY_TYPE_RSA_4096
    assert resolve_key_type(pb.KEY_TYPE_ED25519) == pb.KEY_TYPE_ED25519
    with pytest.raises(errors.InvalidArgument) as info:
        resolve_key_type("ec-p521")
    assert info.value.reason == "key.type_unknown"
    with pytest.raises(errors.InvalidArgument):
        resolve_key_type(pb.KEY_TYPE_UNSPECIFIED)


def test_algorithm_by_cli_name_or_enum() -> None:
    assert resolve_algorithm("rsa-pss-sha384").algorithm == pb.SIGNATURE_ALGORITHM_RSA_PSS_SHA384
    assert resolve_algorithm(pb.SIGNATURE_ALGORITHM_ED25519).cli_name == "ed25519"
    with pytest.raises(errors.InvalidArgument) as info:
        resolve_algorithm("dsa-sha1")
    assert info.value.reason == "sign.algorithm_unknown"


@pytest.mark.parametrize(
    ("alg", "hashlib_name"),
    [("ecdsa-sha256", "sha256"), ("ecdsa-sha384", "sha384"), ("rsa-pss-sha512", "sha512")],
)
def test_data_is_hashed_with_the_algorithms_hash(alg: str, hashlib_name: str) -> None:
    ainfo = ALGORITHM_BY_CLI[alg]
    assert prepare_data(ainfo, b"hello", False) == hashlib.new(hashlib_name, b"hello").digest()
    digest = hashlib.new(hashlib_name, b"x").digest()
    assert prepare_data(ainfo, digest, True) == digest


def test_ed25519_sends_the_message_and_refuses_prehashed() -> None:
    ainfo = ALGORITHM_BY_CLI["ed25519"]
    assert prepare_data(ainfo, b"hello", False) == b"hello"
    with pytest.raises(errors.InvalidArgument) as info:
        prepare_data(ainfo, b"\0" * 32, True)
    assert info.value.reason == "sign.prehashed_unsupported"


Metadata = tuple[tuple[str, str | bytes], ...]


class _Failed(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """The shape of a failed unary call as grpc raises it (status, details, trailers)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: Metadata) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Metadata:  # type: ignore[override]
        return self._trailing

    def initial_metadata(self) -> Metadata:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float:
        return 0.0

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: object) -> bool:
        return False


def test_trailing_error_rebuilds_the_typed_exception() -> None:
    sent = errors.InvalidArgument("sign.digest_length", "needs 32 bytes", {"got": "3"})
    failed = _Failed(
        grpc.StatusCode.INVALID_ARGUMENT,
        "needs 32 bytes",
        (("other", "x"), (errors.ERROR_METADATA_KEY, sent.to_proto().SerializeToString())),
    )
    got = error_from_rpc(failed)
    assert type(got) is errors.InvalidArgument
    assert (got.reason, got.message, got.details) == (
        "sign.digest_length",
        "needs 32 bytes",
        {"got": "3"},
    )


def test_status_only_maps_by_code() -> None:
    got = error_from_rpc(_Failed(grpc.StatusCode.UNAVAILABLE, "connection refused", ()))
    assert type(got) is errors.Unavailable
    assert got.reason == "transport.unavailable"
    got = error_from_rpc(_Failed(grpc.StatusCode.NOT_FOUND, "", ()))
    assert type(got) is errors.NotFound
    assert got.message == "NOT_FOUND"


def test_only_reads_and_requests_with_an_id_are_sent_again() -> None:
    """The failover's rule (edgekms.client.resendable): a state change without a request
    id is never sent a second time, to any broker."""
    from edgekms.client import READ_ONLY, resendable
    from edgekms.v1 import clients_pb2, keys_pb2

    assert resendable("GetKey", keys_pb2.GetKeyRequest(name="k"))
    assert resendable("CreateKey", keys_pb2.CreateKeyRequest(name="k", request_id="r1"))
    assert not resendable("CreateKey", keys_pb2.CreateKeyRequest(name="k"))
    assert not resendable("RevokeClient", clients_pb2.RevokeClientRequest(name="c"))
    # A method this client does not know to be a read is treated as a change.
    assert not resendable("SomethingNew", object())
    assert "RevokeClient" not in READ_ONLY and "Sign" not in READ_ONLY
