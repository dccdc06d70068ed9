"""Bad key requests through the broker of a real `kmsctl up` stack, one case each: raw
gRPC where a client library would refuse first, KMSClient elsewhere. Each refusal is a
typed error and leaves no key record and no token object, and an existing key as it was."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from typing import Any

import grpc
import nats
import pytest

from edgekms import errors
from edgekms.algorithms import MAX_MESSAGE_SIZE
from edgekms.client_certs import INTERNAL_CA_KEY
from edgekms.crypto_client import CryptoClient
from edgekms.v1 import common_pb2 as pb
from edgekms.v1 import keys_pb2, keys_pb2_grpc
from mgmt.client import KMSClient
from mgmt.natsauth import local_credentials
from tests.e2e.conftest import KmsStack
from tests.e2e.test_broker import issue_client_cert

DIGEST = hashlib.sha256(b"hello").digest()
P256 = "badinput/p256"
ED25519 = "badinput/ed25519"


def channel(stack: KmsStack) -> grpc.Channel:
    client_dir = stack.data_dir / "client"
    creds = grpc.ssl_channel_credentials(
        (client_dir / "ca.crt").read_bytes(),
        (client_dir / "admin.key").read_bytes(),
        (client_dir / "admin.crt").read_bytes(),
    )
    return grpc.secure_channel(
        stack.broker, creds, options=[("grpc.ssl_target_name_override", "edgekms-broker")]
    )


def raw(ch: grpc.Channel, method: str) -> Any:
    """A call that sends bytes as they are, bypassing the generated stubs."""
    return ch.unary_unary(method, request_serializer=None, response_deserializer=None)


def typed(error: grpc.RpcError) -> errors.KMSError:
    metadata: Any = error.trailing_metadata() or ()  # type: ignore[attr-defined]
    trailing = {m.key: m.value for m in metadata}
    return errors.from_bytes(trailing[errors.ERROR_METADATA_KEY])


def records(stack: KmsStack) -> dict[str, tuple[str, int]]:
    """Every key record, destroyed ones too: name -> (key id, state)."""
    with stack.client() as client:
        return {k.name: (k.key_id, k.state) for k in client.list_keys(include_destroyed=True)}


def token_objects(stack: KmsStack, provider: str = "hsm0") -> set[bytes]:
    """The key ids the token itself holds, asked over the bus as the broker asks."""

    async def ask() -> set[bytes]:
        options = local_credentials(stack.data_dir, "broker").connect_options()
        nc = await nats.connect(stack.nats_url, **options)
        try:
            listed = await CryptoClient(nc, default_timeout=10).list_keys(provider)
            return {k.key_id for k in listed.keys}
        finally:
            await nc.close()

    return asyncio.run(ask())


@pytest.fixture(scope="module")
def keys(kms_stack: KmsStack) -> Iterator[KMSClient]:
    with kms_stack.client() as client:
        for name, key_type in ((P256, "ec-p256"), (ED25519, "ed25519")):
            try:
                client.get_key(name)
            except errors.NotFound:
                client.create_key(name, key_type)
        yield client


# -- creating -------------------------------------------------------------------------


CREATE_CASES: dict[str, tuple[keys_pb2.CreateKeyRequest, str]] = {
    "empty_request": (keys_pb2.CreateKeyRequest(), "key.name_missing"),
    "name_with_space": (
        keys_pb2.CreateKeyRequest(name="bad name", key_type=pb.KEY_TYPE_EC_P256),
        "key.name_invalid",
    ),
    "name_with_dotdot": (
        keys_pb2.CreateKeyRequest(name="a/../b", key_type=pb.KEY_TYPE_EC_P256),
        "key.name_invalid",
    ),
    "pcr_index_out_of_range": (
        keys_pb2.CreateKeyRequest(
            name="badinput/pcr",
            key_type=pb.KEY_TYPE_EC_P256,
            options=pb.KeyOptions(pcr_indexes=[24]),
        ),
        "key.pcr_invalid",
    ),
    "policy_operation_99": (
        keys_pb2.CreateKeyRequest(
            name="badinput/op99",
            key_type=pb.KEY_TYPE_EC_P256,
            policy=pb.KeyPolicy(
                rules=[pb.PolicyRule(roles=["signer"], operations=[pb.KeyOperation.ValueType(99)])]
            ),
        ),
        "policy.operation_unknown",
    ),
    "policy_unknown_role": (
        keys_pb2.CreateKeyRequest(
            name="badinput/role",
            key_type=pb.KEY_TYPE_EC_P256,
            policy=pb.KeyPolicy(
                rules=[pb.PolicyRule(roles=["root"], operations=[pb.KEY_OPERATION_SIGN])]
            ),
        ),
        "policy.role_unknown",
    ),
    "policy_100_rules": (
        keys_pb2.CreateKeyRequest(
            name="badinput/rules",
            key_type=pb.KEY_TYPE_EC_P256,
            policy=pb.KeyPolicy(
                rules=[pb.PolicyRule(roles=["signer"], operations=[pb.KEY_OPERATION_SIGN])] * 100
            ),
        ),
        "policy.too_many_rules",
    ),
    "policy_rule_of_5000_clients": (
        keys_pb2.CreateKeyRequest(
            name="badinput/bigrule",
            key_type=pb.KEY_TYPE_EC_P256,
            policy=pb.KeyPolicy(
                rules=[
                    pb.PolicyRule(
                        clients=[f"c{i}" for i in range(5000)],
                        operations=[pb.KEY_OPERATION_SIGN],
                    )
                ]
            ),
        ),
        "policy.rule_too_large",
    ),
    "oversized_labels": (
        keys_pb2.CreateKeyRequest(
            name="badinput/labels",
            key_type=pb.KEY_TYPE_EC_P256,
            labels={f"l{i}": "v" * 200 for i in range(1000)},
        ),
        "key.labels_invalid",
    ),
    "oversized_label_value": (
        keys_pb2.CreateKeyRequest(
            name="badinput/label",
            key_type=pb.KEY_TYPE_EC_P256,
            labels={"note": "v" * 100_000},
        ),
        "key.labels_invalid",
    ),
}


@pytest.mark.parametrize("case", list(CREATE_CASES))
def test_bad_create_stores_nothing(kms_stack: KmsStack, case: str) -> None:
    request, reason = CREATE_CASES[case]
    before, objects = records(kms_stack), token_objects(kms_stack)
    with channel(kms_stack) as ch, pytest.raises(grpc.RpcError) as refused:
        keys_pb2_grpc.KeyServiceStub(ch).CreateKey(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert typed(refused.value).reason == reason
    assert records(kms_stack) == before
    assert token_objects(kms_stack) == objects


def test_duplicate_name_keeps_the_first_key_and_makes_no_token_object(
    kms_stack: KmsStack, keys: KMSClient
) -> None:
    before, objects = records(kms_stack), token_objects(kms_stack)
    with pytest.raises(errors.AlreadyExists) as refused:
        keys.create_key(P256, "ec-p384")
    assert refused.value.reason == "key.exists"
    assert records(kms_stack) == before
    assert token_objects(kms_stack) == objects


def test_reserved_internal_ca_name_is_refused(kms_stack: KmsStack, keys: KMSClient) -> None:
    ca = keys.get_key(INTERNAL_CA_KEY)
    objects = token_objects(kms_stack)
    with pytest.raises(errors.InvalidArgument) as refused:
        keys.create_key(INTERNAL_CA_KEY, "ec-p256")
    assert refused.value.reason == "key.reserved"
    after = keys.get_key(INTERNAL_CA_KEY)
    assert (after.key_id, after.created_at, after.state) == (ca.key_id, ca.created_at, ca.state)
    assert token_objects(kms_stack) == objects


def test_reserved_prefix_is_refused_and_stores_nothing(
    kms_stack: KmsStack, keys: KMSClient
) -> None:
    name = "edgekms/not-yours"
    before, objects = records(kms_stack), token_objects(kms_stack)
    try:
        with pytest.raises(errors.KMSError) as refused:
            keys.create_key(name, "ec-p256")
        assert refused.value.reason == "key.reserved"
        assert records(kms_stack) == before
        assert token_objects(kms_stack) == objects
    finally:
        assert name not in records(kms_stack)


def test_policy_of_reserved_key_cannot_change(kms_stack: KmsStack, keys: KMSClient) -> None:
    before = keys.get_key(INTERNAL_CA_KEY)
    policy = pb.KeyPolicy(
        rules=[pb.PolicyRule(roles=["signer"], operations=[pb.KEY_OPERATION_SIGN])]
    )
    with pytest.raises(errors.FailedPrecondition) as refused:
        keys.update_key_policy(INTERNAL_CA_KEY, policy)
    assert refused.value.reason == "key.reserved"
    assert keys.get_key(INTERNAL_CA_KEY).policy == before.policy


def test_signer_may_not_create_and_nothing_is_stored(kms_stack: KmsStack) -> None:
    cert, key = issue_client_cert(kms_stack, "badinput-signer", "signer")
    ca = (kms_stack.data_dir / "client" / "ca.crt").read_bytes()
    before, objects = records(kms_stack), token_objects(kms_stack)
    with (
        KMSClient(
            kms_stack.broker, ca_cert=ca, cert=cert, key=key, server_name="edgekms-broker"
        ) as signer,
        pytest.raises(errors.PermissionDenied) as refused,
    ):
        signer.create_key("badinput/by-signer", "ec-p256")
    assert refused.value.reason == "authz.role_denied"
    assert records(kms_stack) == before
    assert token_objects(kms_stack) == objects


# -- using ----------------------------------------------------------------------------


SIGN_CASES: dict[str, tuple[str, int, bytes, str]] = {
    "digest_too_short": (
        P256,
        pb.SIGNATURE_ALGORITHM_ECDSA_SHA256,
        DIGEST[:31],
        "sign.digest_length",
    ),
    "sha256_digest_for_sha384": (
        P256,
        pb.SIGNATURE_ALGORITHM_ECDSA_SHA384,
        DIGEST,
        "sign.digest_length",
    ),
    "algorithm_unknown_enum": (P256, 99, DIGEST, "sign.algorithm_unknown"),
    "algorithm_missing": (
        P256,
        pb.SIGNATURE_ALGORITHM_UNSPECIFIED,
        DIGEST,
        "sign.algorithm_missing",
    ),
    "algorithm_of_other_family": (
        P256,
        pb.SIGNATURE_ALGORITHM_RSA_PKCS1_SHA256,
        DIGEST,
        "sign.algorithm_mismatch",
    ),
    "data_missing": (P256, pb.SIGNATURE_ALGORITHM_ECDSA_SHA256, b"", "sign.data_missing"),
    "ed25519_message_too_large": (
        ED25519,
        pb.SIGNATURE_ALGORITHM_ED25519,
        b"m" * (MAX_MESSAGE_SIZE + 1),
        "sign.message_too_large",
    ),
}


@pytest.mark.parametrize("case", list(SIGN_CASES))
def test_bad_sign_is_invalid_and_key_unchanged(
    kms_stack: KmsStack, keys: KMSClient, case: str
) -> None:
    name, algorithm, data, reason = SIGN_CASES[case]
    before = keys.get_key(name)
    request = keys_pb2.SignRequest(name=name, data=data)
    request.algorithm = algorithm  # type: ignore[assignment]
    with channel(kms_stack) as ch, pytest.raises(grpc.RpcError) as refused:
        keys_pb2_grpc.KeyServiceStub(ch).Sign(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert typed(refused.value).reason == reason
    after = keys.get_key(name)
    assert (after.state, after.key_id) == (pb.KEY_STATE_ACTIVE, before.key_id)


def test_unknown_key_is_not_found_and_not_created(kms_stack: KmsStack, keys: KMSClient) -> None:
    with pytest.raises(errors.NotFound) as refused:
        keys.sign_digest("badinput/absent", pb.SIGNATURE_ALGORITHM_ECDSA_SHA256, DIGEST)
    assert refused.value.reason == "key.not_found"
    assert "badinput/absent" not in records(kms_stack)


def test_disabled_key_refuses_to_sign_and_stays_disabled(keys: KMSClient) -> None:
    keys.create_key("badinput/disabled", "ec-p256")
    keys.disable_key("badinput/disabled")
    with pytest.raises(errors.FailedPrecondition) as refused:
        keys.sign("badinput/disabled", b"x")
    assert refused.value.reason == "key.disabled"
    assert keys.get_key("badinput/disabled").state == pb.KEY_STATE_DISABLED


def test_destroyed_key_refuses_to_sign_and_has_no_token_object(
    kms_stack: KmsStack, keys: KMSClient
) -> None:
    made = keys.create_key("badinput/destroyed", "ec-p256")
    assert bytes.fromhex(made.key_id) in token_objects(kms_stack)
    keys.destroy_key("badinput/destroyed")
    with pytest.raises(errors.FailedPrecondition) as refused:
        keys.sign("badinput/destroyed", b"x")
    assert refused.value.reason == "key.destroyed"
    assert bytes.fromhex(made.key_id) not in token_objects(kms_stack)


def test_enabling_a_destroyed_key_is_refused(kms_stack: KmsStack, keys: KMSClient) -> None:
    made = keys.create_key("badinput/gone", "ec-p256")
    keys.destroy_key("badinput/gone")
    with pytest.raises(errors.FailedPrecondition) as refused:
        keys.enable_key("badinput/gone")
    assert refused.value.reason == "key.destroyed"
    assert records(kms_stack)["badinput/gone"] == (made.key_id, pb.KEY_STATE_DESTROYED)


# -- the gRPC surface -----------------------------------------------------------------


def test_unknown_method_is_unimplemented(kms_stack: KmsStack) -> None:
    before = records(kms_stack)
    with channel(kms_stack) as ch, pytest.raises(grpc.RpcError) as refused:
        raw(ch, "/edgekms.v1.KeyService/ExportKey")(b"", timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert records(kms_stack) == before


def test_oversize_message_is_resource_exhausted(kms_stack: KmsStack, keys: KMSClient) -> None:
    before = records(kms_stack)
    request = keys_pb2.CreateKeyRequest(
        name="badinput/huge", key_type=pb.KEY_TYPE_EC_P256, labels={"x": "y" * (300 * 1024)}
    )
    with channel(kms_stack) as ch, pytest.raises(grpc.RpcError) as refused:
        keys_pb2_grpc.KeyServiceStub(ch).CreateKey(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert records(kms_stack) == before


def test_operator_may_not_set_a_policy_at_create(kms_stack: KmsStack) -> None:
    """Policies are admin-only (UpdateKeyPolicy); CreateKey was a way around that."""
    cert, key = issue_client_cert(kms_stack, "badinput-operator", "operator")
    ca = (kms_stack.data_dir / "client" / "ca.crt").read_bytes()
    before, objects = records(kms_stack), token_objects(kms_stack)
    policy = pb.KeyPolicy(
        rules=[pb.PolicyRule(roles=["operator"], operations=[pb.KEY_OPERATION_SIGN])]
    )
    with (
        KMSClient(
            kms_stack.broker, ca_cert=ca, cert=cert, key=key, server_name="edgekms-broker"
        ) as operator,
        pytest.raises(errors.PermissionDenied) as refused,
    ):
        operator.create_key("badinput/by-operator", "ec-p256", policy=policy)
    assert refused.value.reason == "authz.policy_admin_only"
    assert records(kms_stack) == before
    assert token_objects(kms_stack) == objects


def test_garbage_to_tail_audit_is_invalid_argument(kms_stack: KmsStack) -> None:
    """It used to be UNKNOWN with a Python decode error."""
    with channel(kms_stack) as ch, pytest.raises(grpc.RpcError) as refused:
        call = ch.unary_stream(
            "/edgekms.v1.AuditService/TailAudit",
            request_serializer=None,
            response_deserializer=None,
        )
        list(call(b"\x08\xff\xff", timeout=10))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert typed(refused.value).reason == "request.malformed"


def test_tail_audit_of_a_bad_writer_is_refused(kms_stack: KmsStack) -> None:
    """A writer names a stream (KMS_AUDIT_<WRITER>): no dots, wildcards or spaces."""
    with kms_stack.client() as client:
        for writer in ("a.b", ">", "x y"):
            with pytest.raises(errors.InvalidArgument) as refused:
                list(client.tail_audit(1, writer=writer))
            assert refused.value.reason == "audit.writer_invalid", writer
        denied = [
            e
            for item in client.tail_audit(1, writer="broker")
            if item.HasField("record")
            for e in item.record.entries
            if e.action == "TailAudit" and e.outcome == "audit.writer_invalid"
        ]
    assert len(denied) == 3  # each refusal audited


def test_tail_audit_of_an_unknown_writer_is_not_found(kms_stack: KmsStack) -> None:
    with kms_stack.client() as client, pytest.raises(errors.NotFound) as refused:
        list(client.tail_audit(1, writer="nobody"))
    assert refused.value.reason == "audit.writer_unknown"


def test_garbage_bytes_are_invalid_argument(kms_stack: KmsStack) -> None:
    before = records(kms_stack)
    try:
        with channel(kms_stack) as ch, pytest.raises(grpc.RpcError) as refused:
            raw(ch, "/edgekms.v1.KeyService/CreateKey")(b"\x0a\xff\x01", timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert typed(refused.value).reason == "request.malformed"
    finally:
        assert records(kms_stack) == before
