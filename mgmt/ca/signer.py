"""Where the CA's keys live and how its builders reach them.

cryptography's builders call key.sign() synchronously, so the CA runs them on worker
threads; a KMSDigestSigner bridges each sign() from that thread to the asyncio
CryptoClient on the service's event loop. A KeyBackend is the CA's view of the KMS: make
a key in a provider, give back a signing key object for it, remove one on rollback.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Protocol

from edgekms.algorithms import KeyType, SignatureAlgorithm
from edgekms.errors import DeadlineExceeded, KMSError
from edgekms.v1 import crypto_pb2
from mgmt.ca.builder import CAKey
from mgmt.remote_key import remote_key

log = logging.getLogger(__name__)


class CryptoClientLike(Protocol):
    """The parts of edgekms.crypto_client.CryptoClient the CA uses."""

    async def sign(
        self, provider: str, request: crypto_pb2.SignRequest
    ) -> crypto_pb2.SignResponse: ...

    async def generate_key(
        self, provider: str, request: crypto_pb2.GenerateKeyRequest
    ) -> crypto_pb2.GenerateKeyResponse: ...

    async def destroy_key(
        self, provider: str, request: crypto_pb2.DestroyKeyRequest
    ) -> crypto_pb2.DestroyKeyResponse: ...


class KeyBackend(Protocol):
    async def generate(self, provider: str, label: str, key_type: KeyType) -> tuple[bytes, bytes]:
        """(key_id, SubjectPublicKeyInfo DER) of a new key."""
        ...

    def signing_key(self, provider: str, key_id: bytes, public_key_der: bytes) -> CAKey:
        """A private-key object whose sign() may be called from a worker thread."""
        ...

    async def destroy(self, provider: str, key_id: bytes) -> None: ...


class KMSDigestSigner:
    """DigestSigner for a RemoteKey: signs on the crypto service, from a worker thread."""

    def __init__(
        self,
        client: CryptoClientLike,
        provider: str,
        key_id: bytes,
        loop: asyncio.AbstractEventLoop,
        timeout: float = 15.0,
    ):
        self._client = client
        self._provider = provider
        self._key_id = key_id
        self._loop = loop
        self._timeout = timeout

    def sign_digest(self, algorithm: SignatureAlgorithm, data: bytes) -> bytes:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None  # a worker thread, as it should be
        if running is self._loop:
            # Waiting here would block the very loop that must send the request.
            raise RuntimeError("KMSDigestSigner blocks: run the builder in a worker thread")
        request = crypto_pb2.SignRequest(key_id=self._key_id, algorithm=algorithm, data=data)
        future = asyncio.run_coroutine_threadsafe(
            self._client.sign(self._provider, request), self._loop
        )
        try:
            return future.result(self._timeout).signature
        except TimeoutError:
            future.cancel()
            raise DeadlineExceeded(
                "ca.sign_timeout", f"the {self._provider} crypto service did not sign in time"
            ) from None


class KMSKeyBackend:
    """The CA's keys in the KMS, reached through the crypto services over NATS."""

    def __init__(self, client: CryptoClientLike, loop: asyncio.AbstractEventLoop | None = None):
        self._client = client
        self._loop = loop

    async def generate(self, provider: str, label: str, key_type: KeyType) -> tuple[bytes, bytes]:
        self._loop = self._loop or asyncio.get_running_loop()
        request = crypto_pb2.GenerateKeyRequest(
            key_id=secrets.token_bytes(16), label=label, key_type=key_type
        )
        response = await self._client.generate_key(provider, request)
        log.info("event=ca_key_generated provider=%s label=%s", provider, label)
        return response.key_id or request.key_id, response.public_key_der

    def signing_key(self, provider: str, key_id: bytes, public_key_der: bytes) -> CAKey:
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        return remote_key(KMSDigestSigner(self._client, provider, key_id, loop), public_key_der)

    async def destroy(self, provider: str, key_id: bytes) -> None:
        try:
            await self._client.destroy_key(provider, crypto_pb2.DestroyKeyRequest(key_id=key_id))
        except KMSError as exc:
            log.warning("event=ca_key_destroy_failed provider=%s reason=%s", provider, exc.reason)
