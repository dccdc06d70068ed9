"""TLS for the CA's own HTTPS listeners, whose certificates it issues and renews itself:
the ACME listener (an https-server certificate from the mini-CA) and the `https_spiffe`
bundle endpoint (an X509-SVID from the SPIFFE CA). `keep_renewed` is their one renewal
loop, `load_identity` puts each new certificate into the listener's context.

Why a helper: Python's ssl loads a certificate and key only from files, and the key of
such a listener lives in the CA's memory. It goes through a 0600 file in a private
temporary directory for the one call and is gone after; reusing the context makes new
handshakes take the renewed certificate while open connections keep theirs."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from edgekms.errors import KMSError

log = logging.getLogger(__name__)


def load_identity(
    context: ssl.SSLContext | None, key: PrivateKeyTypes, chain_pem: bytes, prefix: str
) -> ssl.SSLContext:
    """`context` (a new server context if None, TLS 1.2 or later) now presenting
    `chain_pem` (the leaf first) with `key`."""
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    context = context or ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        key_file = Path(tmp) / "key.pem"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key_pem)
        (Path(tmp) / "chain.pem").write_bytes(chain_pem)
        context.load_cert_chain(Path(tmp) / "chain.pem", key_file)
    return context


async def keep_renewed(
    load: Callable[[], Awaitable[x509.Certificate]],
    open_listener: Callable[[], Awaitable[None]],
    retry: float,
    waiting_event: str,
) -> None:
    """Run for the listener's life: `load` a certificate (issue it and put it in the
    context), open the listener after the first one, and load the next at two thirds of
    each one's life. While the CA cannot issue yet (no CA, no trust domain: KMSError),
    log `waiting_event` and try again every `retry` seconds; the listener stays closed
    until it has a certificate."""
    opened = False
    while True:
        try:
            cert = await load()
        except KMSError as exc:
            log.info("event=%s reason=%s", waiting_event, exc.reason)
            await asyncio.sleep(retry)
            continue
        if not opened:
            await open_listener()
            opened = True
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        renew_at = cert.not_valid_before_utc + life * 2 / 3
        now = datetime.datetime.now(datetime.UTC)
        await asyncio.sleep(max(retry, (renew_at - now).total_seconds()))
