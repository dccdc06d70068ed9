"""kms.crypto.<provider>.SignBatch on a real kms-crypto process and SoftHSM token (and, for
the auth guard, a crypto service on a real swtpm): results come back in request order
and verify, a bad item gets its own typed error without failing the others, and a
payload that is not a usable batch is refused whole with a stable reason."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

import nats
import nats.aio.client
import pytest

from crypto_service.service import MAX_SIGN_BATCH
from edgekms.algorithms import SignatureAlgorithm, verify_signature
from edgekms.crypto_client import CryptoClient
from edgekms.errors import InvalidArgument, KMSError, from_bytes, from_proto
from edgekms.subjects import crypto_subject
from edgekms.v1 import common_pb2 as pb
from edgekms.v1 import crypto_pb2
from mgmt.natsserver import NatsServer
from tests.crypto.conftest import CryptoProcess
from tests.tpm.guarded import MAX_TRIES, guarded_tpm, lockout_counter
from tests.tpm.swtpm_fixtures import SwtpmFactory, swtpm_factory

__all__ = ["swtpm_factory"]

P = "hsm0"
ECDSA = pb.SIGNATURE_ALGORITHM_ECDSA_SHA256
RSA = pb.SIGNATURE_ALGORITHM_RSA_PKCS1_SHA256


async def _key(client: CryptoClient, key_type: pb.KeyType.ValueType) -> tuple[bytes, bytes]:
    """A fresh key on hsm0: (key id, public key DER)."""
    made = await client.generate_key(
        P,
        crypto_pb2.GenerateKeyRequest(
            key_id=secrets.token_bytes(16), label="batch", key_type=key_type
        ),
        timeout=60,
    )
    return made.key_id, made.public_key_der


def _digest(i: int) -> bytes:
    return hashlib.sha256(f"item {i}".encode()).digest()


def _item(key_id: bytes, algorithm: SignatureAlgorithm, data: bytes) -> crypto_pb2.SignRequest:
    return crypto_pb2.SignRequest(key_id=key_id, algorithm=algorithm, data=data)


def _error(result: crypto_pb2.SignResult) -> KMSError:
    assert result.WhichOneof("outcome") == "error", result
    return from_proto(result.error)


async def test_results_in_request_order_and_every_signature_verifies(
    hsm0: CryptoProcess, client: CryptoClient
) -> None:
    ec_id, ec_der = await _key(client, pb.KEY_TYPE_EC_P256)
    rsa_id, rsa_der = await _key(client, pb.KEY_TYPE_RSA_2048)
    # Interleaved keys and distinct digests: a result in the wrong place cannot verify.
    plan = [(ec_id, ec_der, ECDSA) if i % 3 else (rsa_id, rsa_der, RSA) for i in range(40)]
    request = crypto_pb2.SignBatchRequest(
        requests=[_item(key_id, alg, _digest(i)) for i, (key_id, _, alg) in enumerate(plan)]
    )
    answer = await client.sign_batch(P, request, timeout=30)
    assert len(answer.results) == len(plan)
    for i, ((_, der, alg), result) in enumerate(zip(plan, answer.results, strict=True)):
        assert result.WhichOneof("outcome") == "signature", result
        assert verify_signature(der, alg, _digest(i), result.signature), i
    # Swapped, they do not: the check above really tells positions apart.
    assert not verify_signature(ec_der, ECDSA, _digest(1), answer.results[2].signature)


async def test_a_bad_item_gets_its_own_error_and_the_rest_sign(
    hsm0: CryptoProcess, client: CryptoClient
) -> None:
    key_id, der = await _key(client, pb.KEY_TYPE_EC_P256)
    items = [
        _item(key_id, ECDSA, _digest(0)),
        _item(secrets.token_bytes(16), ECDSA, _digest(1)),  # no such key
        _item(key_id, ECDSA, b"short"),  # not a SHA-256 digest
        _item(key_id, 4242, _digest(3)),  # type: ignore[arg-type]  # no such algorithm
        _item(b"", ECDSA, _digest(4)),  # no key id
        _item(key_id, RSA, _digest(5)),  # an RSA scheme for an EC key
        _item(key_id, ECDSA, _digest(6)),
    ]
    answer = await client.sign_batch(P, crypto_pb2.SignBatchRequest(requests=items), timeout=30)
    results = list(answer.results)
    assert len(results) == len(items)
    for good in (0, 6):
        assert verify_signature(der, ECDSA, _digest(good), results[good].signature)
    expected = {
        1: ("NotFound", "key.not_found"),
        2: ("InvalidArgument", "sign.digest_length"),
        3: ("InvalidArgument", "sign.algorithm_unknown"),
        4: ("InvalidArgument", "key.id_missing"),
        5: ("InvalidArgument", "sign.algorithm_mismatch"),
    }
    for index, (cls, reason) in expected.items():
        err = _error(results[index])
        assert (type(err).__name__, err.reason) == (cls, reason), index


async def _refusal(nc: nats.aio.client.Client, payload: bytes) -> KMSError:
    reply = await nc.request(crypto_subject(P, "SignBatch"), payload, timeout=10)
    assert reply.headers is not None
    assert reply.headers["Nats-Service-Error-Code"] == "ERROR_CODE_INVALID_ARGUMENT"
    return from_bytes(reply.data)


async def test_empty_batch_is_refused(hsm0: CryptoProcess, nc: nats.aio.client.Client) -> None:
    err = await _refusal(nc, crypto_pb2.SignBatchRequest().SerializeToString())
    assert isinstance(err, InvalidArgument)
    assert err.reason == "batch.empty"


async def test_oversize_batch_is_refused_before_any_signing(
    hsm0: CryptoProcess, client: CryptoClient
) -> None:
    key_id, der = await _key(client, pb.KEY_TYPE_EC_P256)
    items = [_item(key_id, ECDSA, _digest(i)) for i in range(MAX_SIGN_BATCH + 1)]
    with pytest.raises(InvalidArgument) as info:
        await client.sign_batch(P, crypto_pb2.SignBatchRequest(requests=items), timeout=30)
    assert info.value.reason == "batch.too_large"
    assert info.value.details["max_items"] == str(MAX_SIGN_BATCH)
    # The limit itself is a batch like any other.
    answer = await client.sign_batch(
        P, crypto_pb2.SignBatchRequest(requests=items[:MAX_SIGN_BATCH]), timeout=60
    )
    assert len(answer.results) == MAX_SIGN_BATCH
    last = answer.results[-1].signature
    assert verify_signature(der, ECDSA, _digest(MAX_SIGN_BATCH - 1), last)


async def test_malformed_batch_is_refused(hsm0: CryptoProcess, nc: nats.aio.client.Client) -> None:
    err = await _refusal(nc, b"\x0a\xff\x01")
    assert isinstance(err, InvalidArgument)
    assert err.reason == "request.malformed"


# --- the TPM's auth guard, item by item -------------------------------------------------


@pytest.mark.tpm
async def test_one_batch_cannot_spend_the_tpm_auth_budget(
    nats_server: NatsServer, swtpm_factory: SwtpmFactory, tmp_path: Path
) -> None:
    """All items pass the guard's check up front (nothing has failed yet); the guard is
    asked again before each one reaches the TPM, so wrong guesses stop one short of
    lockout even inside one batch."""
    async with guarded_tpm(nats_server.url, swtpm_factory(), tmp_path, "tpmbatch") as tpm:
        crypto, key_id = tpm.crypto, tpm.key_id
        good = await crypto.sign_batch(
            "tpmbatch",
            crypto_pb2.SignBatchRequest(requests=[_item(key_id, ECDSA, _digest(0))]),
            timeout=30,
        )
        assert verify_signature(tpm.public_key_der, ECDSA, _digest(0), good.results[0].signature)

        tpm.auth.write_bytes(b"a wrong guess")
        items = [_item(key_id, ECDSA, _digest(i)) for i in range(6)]
        answer = await crypto.sign_batch(
            "tpmbatch", crypto_pb2.SignBatchRequest(requests=items), timeout=60
        )
        errors = [_error(result) for result in answer.results]
        spent = MAX_TRIES - 1
        assert [(type(e).__name__, e.reason) for e in errors] == [
            ("PermissionDenied", "tpm.auth_failed")
        ] * spent + [("ResourceExhausted", "auth.throttled")] * (len(items) - spent)
    assert lockout_counter(tpm.tcti) == MAX_TRIES - 1
