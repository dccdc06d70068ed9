"""Our SPIFFE bundle endpoint over the `https_spiffe` profile: a listener of its own
(ca.toml `spiffe_bundle_listen`, `kmsctl up --spiffe-bundle-listen`) serving only
GET /spiffe/bundle, whose TLS server certificate is an X509-SVID of our trust domain
(spiffe://<td>/edgekms/bundle-endpoint) signed by the SPIFFE CA in the token.

Why a listener of its own rather than the ACME one: a TLS listener presents one
certificate, and a SPIRE peer's `https_web` client checks host names against the Web
PKI while its `https_spiffe` client wants an SVID with no host name at all, so one
listener cannot serve both peers. The SVID's key is made in this process and lives in
memory (a 0600 temporary file exists only while the TLS context loads it, as for the
ACME listener); the SVID lasts an hour and is renewed after two thirds of it, so a
rotation of our SPIFFE CA reaches it within 40 minutes (the old CA's SVID still chains
to the bundle's root meanwhile). Until the trust domain exists the listener is not
opened and the CA tries again every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import ssl
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca_service.http import (
    SPIFFE_BUNDLE_PATH,
    HttpServer,
    Request,
    Response,
    spiffe_bundle_handler,
)
from ca_service.servertls import keep_renewed, load_identity
from ca_service.spiffe import SpiffeAuthority

if TYPE_CHECKING:
    from ca_service.authority import CertificateAuthority

log = logging.getLogger(__name__)

SVID_TTL = datetime.timedelta(hours=1)
RETRY_SECONDS = 5.0


class SpiffeBundleEndpoint:
    """The `https_spiffe` listener and the SVID it presents, kept fresh."""

    def __init__(self, ca: CertificateAuthority, host: str, port: int) -> None:
        self.spiffe = SpiffeAuthority(ca)
        self.host = host
        self.port = port
        self.http: HttpServer | None = None
        self.svid: x509.Certificate | None = None
        self._tls: ssl.SSLContext | None = None
        self._task: asyncio.Task[None] | None = None
        handler = spiffe_bundle_handler(ca)

        async def bundle(request: Request) -> Response:
            response = await handler(request)
            response.headers.setdefault("Cache-Control", "no-store")
            return response

        self._routes = {("GET", SPIFFE_BUNDLE_PATH): bundle, ("HEAD", SPIFFE_BUNDLE_PATH): bundle}

    async def start(self) -> None:
        self._task = asyncio.create_task(self._keep_svid())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.http is not None:
            await self.http.cleanup()

    async def _keep_svid(self) -> None:
        await keep_renewed(
            self._load_svid, self._open, RETRY_SECONDS, "spiffe_bundle_endpoint_waiting"
        )

    async def _open(self) -> None:
        assert self._tls is not None
        server = HttpServer(dict(self._routes))
        await server.start(self.host, self.port, self._tls)
        self.http = server
        log.info(
            "event=spiffe_bundle_endpoint_listening host=%s port=%d profile=https_spiffe",
            self.host,
            self.port,
        )

    async def _load_svid(self) -> x509.Certificate:
        key = ec.generate_private_key(ec.SECP256R1())
        cert, ca_der = await self.spiffe.sign_endpoint_svid(key.public_key(), SVID_TTL)
        chain = cert.public_bytes(serialization.Encoding.PEM) + x509.load_der_x509_certificate(
            ca_der
        ).public_bytes(serialization.Encoding.PEM)
        # New handshakes use the new SVID; open connections keep theirs.
        self._tls = load_identity(self._tls, key, chain, "edgekms-spiffe-")
        self.svid = cert
        return cert
