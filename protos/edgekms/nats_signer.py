"""A DigestSigner that reaches a crypto service over NATS, for code running inside the
system (the bootstrap ceremony, the CA service, the broker issuing client certificates)
rather than through the broker's gRPC API. Shared, so no service imports another's code.

cryptography's builders call sign() synchronously, and the NATS client is asyncio: run
the builder in a worker thread and this signer hands each request to the event loop
(or, with sign_digest_async, stay on the loop and splice the signature in afterwards).
"""

from __future__ import annotations

import asyncio

from edgekms.algorithms import SignatureAlgorithm
from edgekms.crypto_client import CryptoClient
from edgekms.errors import DeadlineExceeded
from edgekms.v1 import crypto_pb2


class NatsDigestSigner:
    def __init__(
        self,
        client: CryptoClient,
        loop: asyncio.AbstractEventLoop,
        provider: str,
        key_id: bytes,
        timeout: float = 10.0,
    ):
        self._client = client
        self._loop = loop
        self._provider = provider
        self._key_id = key_id
        self._timeout = timeout

    async def sign_digest_async(self, algorithm: SignatureAlgorithm, data: bytes) -> bytes:
        """The same signature, awaited on the event loop (no worker thread): for callers
        that compute what to sign themselves (ca_service.leafsign)."""
        request = crypto_pb2.SignRequest(key_id=self._key_id, algorithm=algorithm, data=data)
        response = await self._client.sign(self._provider, request, timeout=self._timeout)
        return bytes(response.signature)

    def sign_digest(self, algorithm: SignatureAlgorithm, data: bytes) -> bytes:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None  # a worker thread, as it should be
        if running is self._loop:
            raise RuntimeError("NatsDigestSigner blocks: call it from a worker thread")
        request = crypto_pb2.SignRequest(key_id=self._key_id, algorithm=algorithm, data=data)
        future = asyncio.run_coroutine_threadsafe(
            self._client.sign(self._provider, request, timeout=self._timeout), self._loop
        )
        try:
            return future.result(self._timeout + 1).signature
        except TimeoutError:
            future.cancel()
            raise DeadlineExceeded(
                "sign.timeout", f"the {self._provider} crypto service did not sign in time"
            ) from None
