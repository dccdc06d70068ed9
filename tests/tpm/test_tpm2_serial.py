"""The TPM provider's batch path against a real swtpm: run_serially runs a batch on the TPM
thread and the signs inside it run there directly (no hand-off, no deadlock); the parsed
key records it keeps still see a key removed behind its back."""

from __future__ import annotations

import hashlib
import json
import secrets
import threading

import pytest

from crypto_service.providers.base import KeyCreateOptions, RunsSerially
from crypto_service.providers.pkcs11 import Pkcs11Provider
from crypto_service.providers.tpm2 import Tpm2Provider
from edgekms.algorithms import KEY_TYPE_BY_CLI, verify_signature
from edgekms.errors import NotFound
from edgekms.v1 import common_pb2 as pb

pytestmark = pytest.mark.tpm

P256 = KEY_TYPE_BY_CLI["ec-p256"].key_type
ALG = pb.SIGNATURE_ALGORITHM_ECDSA_SHA256


def test_a_batch_signs_on_the_tpm_thread(provider: Tpm2Provider) -> None:
    assert isinstance(provider, RunsSerially)
    key_id = secrets.token_bytes(16)
    der = provider.generate(key_id, "serial", P256, KeyCreateOptions()).public_key_der
    digests = [hashlib.sha256(b"serial/%d" % n).digest() for n in range(8)]
    caller = threading.get_ident()

    def batch() -> tuple[int, list[bytes]]:
        return threading.get_ident(), [provider.sign(key_id, ALG, d) for d in digests]

    thread, signatures = provider.run_serially(batch)
    assert thread != caller  # ran on the provider's own thread
    assert provider.run_serially(threading.get_ident) == thread  # always that one
    for digest, signature in zip(digests, signatures, strict=True):
        assert verify_signature(der, ALG, digest, signature)


def test_a_key_file_removed_elsewhere_is_not_found_at_the_next_sign(
    provider: Tpm2Provider,
) -> None:
    key_id = secrets.token_bytes(16)
    provider.generate(key_id, "gone", P256, KeyCreateOptions())
    digest = hashlib.sha256(b"gone").digest()
    provider.sign(key_id, ALG, digest)  # the parsed record is now kept
    provider._path(key_id).unlink()  # as another process's destroy would
    with pytest.raises(NotFound):
        provider.sign(key_id, ALG, digest)


def test_pkcs11_is_not_serial() -> None:
    # The PKCS#11 provider signs from several threads at once; only the TPM's runs serially.
    assert not issubclass(Pkcs11Provider, RunsSerially)


async def test_the_service_signs_a_tpm_batch_on_the_tpm_thread(
    provider: Tpm2Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    from crypto_service.service import CryptoService
    from edgekms.v1 import crypto_pb2

    key_id = secrets.token_bytes(16)
    der = provider.generate(key_id, "service", P256, KeyCreateOptions()).public_key_der
    threads: list[str] = []
    real_sign = provider.sign

    def sign(kid: bytes, algorithm: pb.SignatureAlgorithm.ValueType, data: bytes) -> bytes:
        threads.append(threading.current_thread().name)
        return real_sign(kid, algorithm, data)

    monkeypatch.setattr(provider, "sign", sign)
    # The bus is not needed to run one operation: only start() touches it.
    service = CryptoService(None, provider, "tpm0", workers=1)  # type: ignore[arg-type]
    try:
        digests = [hashlib.sha256(b"service/%d" % n).digest() for n in range(5)]
        request = crypto_pb2.SignBatchRequest(
            requests=[crypto_pb2.SignRequest(key_id=key_id, algorithm=ALG, data=d) for d in digests]
        )
        response = await service._ops["SignBatch"](request, "user")
    finally:
        await service.stop()
    assert isinstance(response, crypto_pb2.SignBatchResponse)
    for digest, result in zip(digests, response.results, strict=True):
        assert verify_signature(der, ALG, digest, result.signature)
    # Every sign ran on the provider's TPM thread, none on the service's own workers.
    assert len(threads) == 5 and all(name.startswith("tpm2") for name in threads), threads


async def test_the_service_binds_tpm_keys_to_their_class(provider: Tpm2Provider) -> None:
    """Issue 11, item 1, on the TPM: a key made on the CA's subjects signs only there; the
    class is in the TPM service's key record, so a fresh read gives the same answer."""
    from crypto_service.service import CryptoService
    from edgekms.errors import PermissionDenied
    from edgekms.v1 import crypto_pb2

    service = CryptoService(None, provider, "tpm0", workers=1)  # type: ignore[arg-type]
    key_id = secrets.token_bytes(16)
    digest = hashlib.sha256(b"tbs").digest()
    sign = crypto_pb2.SignRequest(key_id=key_id, algorithm=ALG, data=digest)
    try:
        made = await service._ops["GenerateKey"](
            crypto_pb2.GenerateKeyRequest(key_id=key_id, label="ca/root", key_type=P256), "ca"
        )
        assert isinstance(made, crypto_pb2.GenerateKeyResponse)
        for wrong in ("user", "internal"):
            with pytest.raises(PermissionDenied) as info:
                await service._ops["Sign"](sign, wrong)
            assert info.value.reason == "key.class_mismatch"
        with pytest.raises(PermissionDenied):
            await service._ops["DestroyKey"](crypto_pb2.DestroyKeyRequest(key_id=key_id), "user")
        signed = await service._ops["Sign"](sign, "ca")
        assert isinstance(signed, crypto_pb2.SignResponse)
        assert verify_signature(made.public_key_der, ALG, digest, signed.signature)
        record = json.loads(provider._path(key_id).read_text())
        assert record["key_class"] == "ca"
    finally:
        await service.stop()
        provider.destroy(key_id)
