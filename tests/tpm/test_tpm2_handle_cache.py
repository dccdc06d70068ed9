"""The TPM provider's LRU of loaded signing keys against a real swtpm: a repeated sign reuses
the loaded key, the cache never holds more than swtpm's slots allow, other operations still
find their slots, destroyed keys are unloaded and a handle flushed behind the provider's back
is reloaded rather than failing the sign."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

import pytest
from tpm2_pytss.constants import TPM2_CAP, TPM2_HC
from tpm2_pytss.types import TPM2_HANDLE

from crypto_service.providers.base import KeyCreateOptions
from crypto_service.providers.tpm2 import LOADED_KEYS_MAX, Tpm2Provider
from edgekms.algorithms import KEY_TYPE_BY_CLI, verify_signature
from edgekms.errors import NotFound
from edgekms.v1 import common_pb2 as pb

pytestmark = pytest.mark.tpm

P256 = KEY_TYPE_BY_CLI["ec-p256"].key_type
ALG = pb.SIGNATURE_ALGORITHM_ECDSA_SHA256


def _transient(provider: Tpm2Provider) -> list[int]:
    """Transient handles as the provider's own connection sees them (swtpm serves one)."""

    def read(esys: Any) -> list[int]:
        _, data = esys.get_capability(TPM2_CAP.HANDLES, TPM2_HC.TRANSIENT_FIRST, 64)
        return [int(h) for h in data.data.handles]

    return provider._run("test", read)


def _sign_ok(provider: Tpm2Provider, key_id: bytes, der: bytes, n: int) -> None:
    digest = hashlib.sha256(b"cache/%d" % n).digest()
    assert verify_signature(der, ALG, digest, provider.sign(key_id, ALG, digest))


def _new(provider: Tpm2Provider, label: str, **opts: Any) -> tuple[bytes, bytes]:
    key_id = secrets.token_bytes(16)
    der = provider.generate(key_id, label, P256, KeyCreateOptions(**opts)).public_key_der
    return key_id, der


def test_repeated_signs_reuse_the_loaded_key(provider: Tpm2Provider) -> None:
    key_id, der = _new(provider, "reuse")
    before = _transient(provider)  # the SRK only: generate flushed the cache
    _sign_ok(provider, key_id, der, 0)
    loaded = _transient(provider)
    assert len(loaded) == len(before) + 1
    for n in range(1, 6):
        _sign_ok(provider, key_id, der, n)
        assert _transient(provider) == loaded  # same handle, nothing loaded again


def test_cache_stays_within_slots_and_other_ops_find_theirs(provider: Tpm2Provider) -> None:
    keys = [_new(provider, f"lru{i}", require_auth=i == 1) for i in range(LOADED_KEYS_MAX + 2)]
    baseline = len(_transient(provider))
    for round_ in range(3):
        for n, (key_id, der) in enumerate(keys):
            _sign_ok(provider, key_id, der, round_ * 10 + n)
            assert len(_transient(provider)) <= baseline + LOADED_KEYS_MAX
    # Attestation and creation need slots of their own: no 0x902 with a full cache.
    provider.attest(keys[-1][0], b"nonce")
    _sign_ok(provider, *keys[0], 99)
    _sign_ok(provider, *keys[1], 98)
    fresh = _new(provider, "after-full-cache")
    _sign_ok(provider, *fresh, 97)


def test_destroy_unloads_the_key(provider: Tpm2Provider) -> None:
    key_id, der = _new(provider, "doomed")
    _sign_ok(provider, key_id, der, 0)
    loaded = len(_transient(provider))
    provider.destroy(key_id)
    assert len(_transient(provider)) == loaded - 1
    with pytest.raises(NotFound):
        provider.sign(key_id, ALG, hashlib.sha256(b"gone").digest())


def test_handle_flushed_behind_the_providers_back_is_reloaded(provider: Tpm2Provider) -> None:
    key_id, der = _new(provider, "stale")
    _sign_ok(provider, key_id, der, 0)
    srk_and_key = _transient(provider)

    def flush_key(esys: Any) -> None:
        (handle,) = provider._loaded.values()
        tpm_handle = int(esys.tr_get_tpm_handle(handle))
        assert tpm_handle in srk_and_key
        esys.flush_context(esys.tr_from_tpmpublic(TPM2_HANDLE(tpm_handle)))

    provider._run("test", flush_key)
    assert len(_transient(provider)) == len(srk_and_key) - 1
    _sign_ok(provider, key_id, der, 1)
    assert len(_transient(provider)) == len(srk_and_key)
