"""Hand-made DER for requests cryptography refuses to build (duplicate extensions)."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.ca.helpers import make_csr, san_of

_SAN_OID = bytes.fromhex("0603551d11")  # 2.5.29.17
_STANDIN_OID = bytes.fromhex("0603551d63")  # 2.5.29.99, same length


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def csr_with_duplicate_san() -> bytes:
    """A correctly self-signed CSR whose extension list holds subjectAltName twice."""
    key = ec.generate_private_key(ec.SECP256R1())
    standin = x509.UnrecognizedExtension(
        x509.ObjectIdentifier("2.5.29.99"), san_of("dns:b.example").public_bytes()
    )
    csr = x509.load_pem_x509_csr(
        make_csr(key, sans=("dns:a.example",), extensions=[(standin, False)])
    )
    info = csr.tbs_certrequest_bytes
    assert info.count(_STANDIN_OID) == 1
    info = info.replace(_STANDIN_OID, _SAN_OID)
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    alg = bytes.fromhex("300a06082a8648ce3d040302")  # ecdsa-with-SHA256
    bits = b"\x03" + _der_len(len(signature) + 1) + b"\x00" + signature
    body = info + alg + bits
    der = b"\x30" + _der_len(len(body)) + body
    assert x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.DER) == der
    return der
