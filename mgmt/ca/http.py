"""What relying parties fetch over plain HTTP: the CRL, OCSP (RFC 6960 GET and POST) and
the CA certificates. No authentication: all of it is public and signed.

    GET  /crl            current CRL, DER (application/pkix-crl)
    GET  /ocsp/<base64>  OCSP request in the URL (RFC 6960 A.1)
    POST /ocsp           OCSP request in the body (application/ocsp-request)
    GET  /ca.crt         issuing CA certificate, DER (the AIA caIssuers target)
    GET  /root.crt       root certificate, DER
    GET  /chain.pem      issuing CA then root, PEM
"""

from __future__ import annotations

import base64
import binascii
import logging
from urllib.parse import unquote

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edgekms.errors import KMSError
from mgmt.ca.authority import CertificateAuthority

log = logging.getLogger(__name__)

_MAX_OCSP_BODY = 16 * 1024
OCSP_RESPONSE = "application/ocsp-response"


def make_app(ca: CertificateAuthority) -> web.Application:
    async def crl(_: web.Request) -> web.Response:
        try:
            current = await ca.current_crl()
        except KMSError as exc:
            return web.Response(status=503, text=exc.reason)
        return web.Response(body=current.crl_der, content_type="application/pkix-crl")

    async def ocsp_get(request: web.Request) -> web.Response:
        raw = unquote(request.match_info["req"])
        # Clients send standard or URL-safe base64, padded or not.
        raw = raw.replace("-", "+").replace("_", "/")
        try:
            der = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
        except (binascii.Error, ValueError):
            der = b""
        return web.Response(body=await ca.ocsp(der), content_type=OCSP_RESPONSE)

    async def ocsp_post(request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > _MAX_OCSP_BODY:
            return web.Response(status=413)
        body = await request.content.read(_MAX_OCSP_BODY + 1)
        if len(body) > _MAX_OCSP_BODY:
            return web.Response(status=413)
        return web.Response(body=await ca.ocsp(body), content_type=OCSP_RESPONSE)

    async def ca_cert(_: web.Request) -> web.Response:
        try:
            certs = await ca.ca_certificates()
        except KMSError as exc:
            return web.Response(status=503, text=exc.reason)
        return web.Response(
            body=certs.intermediate_certificate_der, content_type="application/pkix-cert"
        )

    async def root_cert(_: web.Request) -> web.Response:
        try:
            certs = await ca.ca_certificates()
        except KMSError as exc:
            return web.Response(status=503, text=exc.reason)
        return web.Response(body=certs.root_certificate_der, content_type="application/pkix-cert")

    async def chain(_: web.Request) -> web.Response:
        try:
            certs = await ca.ca_certificates()
        except KMSError as exc:
            return web.Response(status=503, text=exc.reason)
        pem = b"".join(
            x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM)
            for d in (certs.intermediate_certificate_der, certs.root_certificate_der)
        )
        return web.Response(body=pem, content_type="application/pem-certificate-chain")

    app = web.Application(client_max_size=_MAX_OCSP_BODY)
    app.router.add_get("/crl", crl)
    app.router.add_get("/ocsp/{req:.+}", ocsp_get)
    app.router.add_post("/ocsp", ocsp_post)
    app.router.add_post("/ocsp/", ocsp_post)
    app.router.add_get("/ca.crt", ca_cert)
    app.router.add_get("/root.crt", root_cert)
    app.router.add_get("/chain.pem", chain)
    return app


async def start_http(ca: CertificateAuthority, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(make_app(ca), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("event=ca_http_listening host=%s port=%d", host, port)
    return runner
