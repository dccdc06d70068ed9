"""The caller's side of the crypto services: typed requests over NATS, typed errors back.

The broker and the CA service talk to every provider through this. A failure always
comes out as an edgekms.errors type: the service's own error (sent with nats.micro's
error headers and an edgekms.v1.Error payload) is rebuilt as the same class, and bus
trouble becomes Unavailable or DeadlineExceeded with a stable reason.
"""

# The timeout parameters are the agreed API (the broker codes against it); they bound one
# NATS request, which asyncio.timeout would not make clearer.
# ruff: noqa: ASYNC109

from __future__ import annotations

import json
import logging
from typing import Any, TypeVar

import nats.aio.client
import nats.errors
from google.protobuf.message import Message

from edgekms import natsrpc
from edgekms.errors import Internal, Unavailable
from edgekms.subjects import KEY_CLASS_USER, crypto_service_name, crypto_subject
from edgekms.v1 import crypto_pb2

log = logging.getLogger(__name__)


R = TypeVar("R", bound=Message)


class CryptoClient:
    """Requests to kms.crypto.<provider>.<Operation> (user keys) or
    kms.crypto.<provider>.<class>.<Operation> (the CA's and the internal CA's keys: a
    client per class, `key_class`); safe to share across tasks."""

    def __init__(
        self,
        nc: nats.aio.client.Client,
        default_timeout: float = 5.0,
        key_class: str = KEY_CLASS_USER,
    ) -> None:
        self.nc = nc
        self.default_timeout = default_timeout
        self.key_class = key_class

    async def _call(
        self,
        provider: str,
        operation: str,
        request: Message,
        response_type: type[R],
        timeout: float | None,
    ) -> R:
        return await natsrpc.request(
            self.nc,
            crypto_subject(provider, operation, self.key_class),
            request,
            response_type,
            self.default_timeout if timeout is None else timeout,
            service=f"provider {provider!r}",
            reason_prefix="provider",
            details={"provider": provider},
        )

    async def generate_key(
        self, provider: str, req: crypto_pb2.GenerateKeyRequest, timeout: float | None = None
    ) -> crypto_pb2.GenerateKeyResponse:
        return await self._call(
            provider, "GenerateKey", req, crypto_pb2.GenerateKeyResponse, timeout
        )

    async def get_public_key(
        self, provider: str, req: crypto_pb2.GetPublicKeyRequest, timeout: float | None = None
    ) -> crypto_pb2.GetPublicKeyResponse:
        return await self._call(
            provider, "GetPublicKey", req, crypto_pb2.GetPublicKeyResponse, timeout
        )

    async def sign(
        self, provider: str, req: crypto_pb2.SignRequest, timeout: float | None = None
    ) -> crypto_pb2.SignResponse:
        return await self._call(provider, "Sign", req, crypto_pb2.SignResponse, timeout)

    async def sign_batch(
        self, provider: str, req: crypto_pb2.SignBatchRequest, timeout: float | None = None
    ) -> crypto_pb2.SignBatchResponse:
        """Many Signs in one message (edgekms.sign_batcher makes these from concurrent
        `sign` calls); each result is a signature or that item's own error."""
        return await self._call(provider, "SignBatch", req, crypto_pb2.SignBatchResponse, timeout)

    async def verify(
        self, provider: str, req: crypto_pb2.VerifyRequest, timeout: float | None = None
    ) -> crypto_pb2.VerifyResponse:
        return await self._call(provider, "Verify", req, crypto_pb2.VerifyResponse, timeout)

    async def destroy_key(
        self, provider: str, req: crypto_pb2.DestroyKeyRequest, timeout: float | None = None
    ) -> crypto_pb2.DestroyKeyResponse:
        return await self._call(provider, "DestroyKey", req, crypto_pb2.DestroyKeyResponse, timeout)

    async def list_keys(
        self, provider: str, timeout: float | None = None
    ) -> crypto_pb2.ListProviderKeysResponse:
        return await self._call(
            provider,
            "ListKeys",
            crypto_pb2.ListProviderKeysRequest(),
            crypto_pb2.ListProviderKeysResponse,
            timeout,
        )

    async def attest(
        self, provider: str, req: crypto_pb2.AttestRequest, timeout: float | None = None
    ) -> crypto_pb2.AttestResponse:
        return await self._call(provider, "Attest", req, crypto_pb2.AttestResponse, timeout)

    async def encrypt(
        self, provider: str, req: crypto_pb2.EncryptRequest, timeout: float | None = None
    ) -> crypto_pb2.EncryptResponse:
        return await self._call(provider, "Encrypt", req, crypto_pb2.EncryptResponse, timeout)

    async def decrypt(
        self, provider: str, req: crypto_pb2.DecryptRequest, timeout: float | None = None
    ) -> crypto_pb2.DecryptResponse:
        return await self._call(provider, "Decrypt", req, crypto_pb2.DecryptResponse, timeout)

    async def ping(self, provider: str, timeout: float = 1.0) -> dict[str, Any]:
        """The first replica's $SRV.PING answer (id, name, version, metadata)."""
        subject = f"$SRV.PING.{crypto_service_name(provider)}"
        try:
            msg = await self.nc.request(subject, b"", timeout=timeout)
        except nats.errors.NoRespondersError:
            raise Unavailable(
                "provider.unavailable",
                f"no crypto service answers for provider {provider!r}",
                {"provider": provider},
            ) from None
        except (TimeoutError, nats.errors.TimeoutError):
            raise Unavailable(
                "provider.unavailable",
                f"provider {provider!r} did not answer a ping within {timeout:g}s",
                {"provider": provider},
            ) from None
        except nats.errors.Error:
            raise Unavailable("bus.unavailable", "the NATS connection is not usable") from None
        try:
            answer = json.loads(msg.data)
        except ValueError:
            raise Internal("wire.bad_response", f"{provider}: the ping reply is not JSON") from None
        if not isinstance(answer, dict):
            raise Internal("wire.bad_response", f"{provider}: the ping reply is not an object")
        return answer
