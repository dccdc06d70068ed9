"""Bad requests on the bus, straight to a real kms-crypto on the SoftHSM token (what the
broker would never send, but anyone on the bus with the right subject could): each is a
typed error in the reply and leaves no object on the token. Also a crypto service that
cannot read its PIN file: it exits before it ever answers."""

from __future__ import annotations

import secrets
from pathlib import Path

import nats.aio.client
import nats.errors
import pytest

from edgekms.algorithms import MAX_MESSAGE_SIZE
from edgekms.crypto_client import CryptoClient
from edgekms.errors import InvalidArgument, Unavailable, from_bytes
from edgekms.subjects import crypto_subject
from edgekms.v1 import common_pb2 as pb
from edgekms.v1 import crypto_pb2
from tests.crypto.conftest import CryptoFactory, CryptoProcess
from tests.logevents import has_event

P = "hsm0"


async def _token_keys(client: CryptoClient) -> set[bytes]:
    return {k.key_id for k in (await client.list_keys(P)).keys}


async def test_malformed_generate_payload_leaves_no_token_object(
    hsm0: CryptoProcess, nc: nats.aio.client.Client, client: CryptoClient
) -> None:
    before = await _token_keys(client)
    reply = await nc.request(crypto_subject(P, "GenerateKey"), b"\x0a\xff\x01", timeout=5)
    assert reply.headers is not None
    assert reply.headers["Nats-Service-Error-Code"] == "ERROR_CODE_INVALID_ARGUMENT"
    err = from_bytes(reply.data)
    assert isinstance(err, InvalidArgument) and err.reason == "request.malformed"
    assert await _token_keys(client) == before


async def test_generate_without_key_type_leaves_no_token_object(
    hsm0: CryptoProcess, client: CryptoClient
) -> None:
    before = await _token_keys(client)
    key_id = secrets.token_bytes(16)
    with pytest.raises(InvalidArgument) as refused:
        await client.generate_key(P, crypto_pb2.GenerateKeyRequest(key_id=key_id, label="x"))
    assert refused.value.reason == "key.type_missing"
    assert await _token_keys(client) == before


async def test_oversize_message_over_nats_is_invalid(
    hsm0: CryptoProcess, client: CryptoClient
) -> None:
    key_id = secrets.token_bytes(16)
    await client.generate_key(
        P,
        crypto_pb2.GenerateKeyRequest(key_id=key_id, label="big", key_type=pb.KEY_TYPE_ED25519),
    )
    try:
        request = crypto_pb2.SignRequest(
            key_id=key_id,
            algorithm=pb.SIGNATURE_ALGORITHM_ED25519,
            data=b"m" * (MAX_MESSAGE_SIZE + 1),
        )
        with pytest.raises(InvalidArgument) as refused:
            await client.sign(P, request)
        assert refused.value.reason == "sign.message_too_large"
        # The key is untouched and still signs a message of the largest allowed size.
        request.data = b"m" * MAX_MESSAGE_SIZE
        assert (await client.sign(P, request)).signature
    finally:
        await client.destroy_key(P, crypto_pb2.DestroyKeyRequest(key_id=key_id))


async def test_unknown_operation_subject_has_no_responder(
    hsm0: CryptoProcess, nc: nats.aio.client.Client, client: CryptoClient
) -> None:
    before = await _token_keys(client)
    with pytest.raises(nats.errors.NoRespondersError):
        await nc.request(crypto_subject(P, "ExportKey"), b"", timeout=5)
    assert await _token_keys(client) == before


async def test_missing_pin_file_exits_2_and_never_registers(
    crypto_factory: CryptoFactory, client: CryptoClient, tmp_path: Path
) -> None:
    proc = crypto_factory("hsmnopin", wait=False, pin_file=tmp_path / "absent.pin")
    assert proc.wait() == 2
    err = proc.stderr()
    assert "pkcs11.pin_file" in err
    assert not has_event(err, "service_started")
    with pytest.raises(Unavailable):
        await client.ping("hsmnopin")
