"""Where the CA's keys live and how its builders reach them.

cryptography's builders call key.sign() synchronously, so the CA runs them on worker
threads; an edgekms.nats_signer.NatsDigestSigner bridges each sign() from that thread to the asyncio
CryptoClient on the service's event loop. A KeyBackend is the CA's view of the KMS: make
a key in a provider, give back a signing key object for it, remove one on rollback.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Protocol

from ca_service.builder import CAKey
from ca_service.leafsign import LeafSigner
from edgekms.algorithms import KeyType
from edgekms.crypto_client import CryptoClient
from edgekms.errors import KMSError, NotFound
from edgekms.nats_signer import NatsDigestSigner
from edgekms.remote_key import remote_key
from edgekms.v1 import crypto_pb2

log = logging.getLogger(__name__)

GENERATE_TIMEOUT = 120.0


class KeyBackend(Protocol):
    async def generate(self, provider: str, label: str, key_type: KeyType) -> tuple[bytes, bytes]:
        """(key_id, SubjectPublicKeyInfo DER) of a new key."""
        ...

    def signing_key(self, provider: str, key_id: bytes, public_key_der: bytes) -> CAKey:
        """A private-key object whose sign() may be called from a worker thread."""
        ...

    async def destroy(self, provider: str, key_id: bytes, strict: bool = False) -> None:
        """Destroy a key in its token. Rollbacks ignore failures (logged); `strict`
        callers (a key no longer needed, whose record is then dropped) get them raised,
        except NotFound: a key already gone is what they wanted."""
        ...

    def leaf_signer(self, provider: str, key_id: bytes, public_key_der: bytes) -> LeafSigner:
        """Signs leaves of this key on the event loop (ca_service.leafsign)."""
        ...


class KMSKeyBackend:
    """The CA's keys in the KMS, reached through the crypto services over NATS."""

    def __init__(self, client: CryptoClient, loop: asyncio.AbstractEventLoop | None = None):
        self._client = client
        self._loop = loop

    async def generate(self, provider: str, label: str, key_type: KeyType) -> tuple[bytes, bytes]:
        self._loop = self._loop or asyncio.get_running_loop()
        request = crypto_pb2.GenerateKeyRequest(
            key_id=secrets.token_bytes(16), label=label, key_type=key_type
        )
        # Key generation in a TPM (RSA above all) can take seconds: the broker's ceiling.
        response = await self._client.generate_key(provider, request, timeout=GENERATE_TIMEOUT)
        log.info("event=ca_key_generated provider=%s label=%s", provider, label)
        return response.key_id or request.key_id, response.public_key_der

    def signing_key(self, provider: str, key_id: bytes, public_key_der: bytes) -> CAKey:
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        signer = NatsDigestSigner(self._client, loop, provider, key_id, timeout=15.0)
        return remote_key(signer, public_key_der)

    def leaf_signer(self, provider: str, key_id: bytes, public_key_der: bytes) -> LeafSigner:
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        signer = NatsDigestSigner(self._client, loop, provider, key_id, timeout=15.0)
        return LeafSigner(signer, public_key_der)

    async def destroy(self, provider: str, key_id: bytes, strict: bool = False) -> None:
        try:
            await self._client.destroy_key(provider, crypto_pb2.DestroyKeyRequest(key_id=key_id))
        except NotFound:
            return
        except KMSError as exc:
            log.warning("event=ca_key_destroy_failed provider=%s reason=%s", provider, exc.reason)
            if strict:
                raise
