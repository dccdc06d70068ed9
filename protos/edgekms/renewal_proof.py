"""Proof that the holder of a certificate's key asks for its renewal with a new key.

Renewal by the holder (docs/security.md, "Renewal by the holder") is allowed to whoever
proves possession of the certified key. For the same key the CSR's self-signature is that
proof. For a new key (rekey) the CSR is signed by the new key, so the old key signs too:
its signature over a fixed domain string and the CSR's DER. The domain keeps the
signature from being mistaken for (or replayed as) a signature of anything else the key
signs, and covering the whole CSR ties the proof to the one new key it names.

Shared by the requester (mgmt) and the CA (ca_service), hence here.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

DOMAIN = b"edgekms-renew-v1\0"

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def sign_renewal(old_key: PrivateKey, csr_der: bytes) -> bytes:
    """The old key's signature over DOMAIN + the CSR (ECDSA/RSA with SHA-256, or Ed25519)."""
    message = DOMAIN + csr_der
    if isinstance(old_key, ec.EllipticCurvePrivateKey):
        return old_key.sign(message, ec.ECDSA(hashes.SHA256()))
    if isinstance(old_key, rsa.RSAPrivateKey):
        return old_key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    return old_key.sign(message)


def verify_renewal(old_public_key: object, csr_der: bytes, signature: bytes) -> bool:
    """True only if `signature` is the old key's over DOMAIN + csr_der."""
    message = DOMAIN + csr_der
    try:
        if isinstance(old_public_key, ec.EllipticCurvePublicKey):
            old_public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(old_public_key, rsa.RSAPublicKey):
            old_public_key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(old_public_key, ed25519.Ed25519PublicKey):
            old_public_key.verify(signature, message)
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True
