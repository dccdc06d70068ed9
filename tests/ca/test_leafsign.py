"""ca_service.leafsign, pure logic: the leaf built on the event loop with a capturing key
and the signature spliced in afterwards is the certificate the builder would have made,
for every CA key type; a wrong signature is refused, never issued. (The live path, a
SoftHSM key over the bus, runs in every issuance test of tests/ca and tests/e2e.)"""

from __future__ import annotations

import asyncio

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from ca_service.builder import CAKey, CaUrls, build_root, ca_name
from ca_service.leafsign import LeafSigner, with_signature
from ca_service.policy import IssuePlan, load_csr, plan_from_csr
from ca_service.profiles import BUILTIN_PROFILES
from edgekms.algorithms import SignatureAlgorithm
from edgekms.errors import Internal
from edgekms.v1 import common_pb2 as pb
from tests.ca.helpers import make_csr, make_key

_HASHES = {
    pb.SIGNATURE_ALGORITHM_ECDSA_SHA256: hashes.SHA256(),
    pb.SIGNATURE_ALGORITHM_ECDSA_SHA384: hashes.SHA384(),
    pb.SIGNATURE_ALGORITHM_RSA_PKCS1_SHA256: hashes.SHA256(),
}


class SoftwareSigner:
    """What the token does, with a key in memory; `corrupt` flips a bit of each answer."""

    def __init__(self, key: CAKey, corrupt: bool = False) -> None:
        self.key = key
        self.corrupt = corrupt
        self.calls = 0

    async def sign_digest_async(self, algorithm: SignatureAlgorithm, data: bytes) -> bytes:
        self.calls += 1
        await asyncio.sleep(0)  # let concurrent builds interleave
        if isinstance(self.key, ed25519.Ed25519PrivateKey):
            signature = self.key.sign(data)
        elif isinstance(self.key, ec.EllipticCurvePrivateKey):
            signature = self.key.sign(data, ec.ECDSA(Prehashed(_HASHES[algorithm])))
        else:
            signature = self.key.sign(data, padding.PKCS1v15(), Prehashed(_HASHES[algorithm]))
        if self.corrupt:
            signature = signature[:-1] + bytes([signature[-1] ^ 1])
        return signature


def _ca(key: CAKey) -> tuple[x509.Certificate, bytes]:
    cert = build_root(key, ca_name("Leafsign Test CA"), 3650)
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return cert, spki


def _plan(host: str) -> IssuePlan:
    csr = make_csr(make_key("ec-p256"), cn=host, sans=(f"dns:{host}",))
    return plan_from_csr(BUILTIN_PROFILES["https-server"], load_csr(csr))


@pytest.mark.parametrize(
    "ca_key",
    [
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP384R1()),
        rsa.generate_private_key(65537, 2048),
        rsa.generate_private_key(65537, 4096),  # a signature longer than 127 bytes
        ed25519.Ed25519PrivateKey.generate(),
    ],
    ids=["p256", "p384", "rsa2048", "rsa4096", "ed25519"],
)
async def test_spliced_leaves_verify_and_carry_what_was_asked(ca_key: CAKey) -> None:
    ca_cert, spki = _ca(ca_key)
    signer = SoftwareSigner(ca_key)
    leaf = LeafSigner(signer, spki)
    urls = CaUrls.from_base("http://ca.example")
    hosts = [f"h{i}.example" for i in range(6)]
    built = await asyncio.gather(
        *(leaf.build(ca_cert, _plan(h), 1000 + i, urls) for i, h in enumerate(hosts))
    )
    assert signer.calls == len(hosts)
    for i, (cert, der) in enumerate(built):
        assert cert.public_bytes(serialization.Encoding.DER) == der
        cert.verify_directly_issued_by(ca_cert)
        assert cert.serial_number == 1000 + i
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [hosts[i]]


async def test_a_wrong_signature_is_refused() -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert, spki = _ca(ca_key)
    leaf = LeafSigner(SoftwareSigner(ca_key, corrupt=True), spki)
    with pytest.raises(Internal) as refused:
        await leaf.build(ca_cert, _plan("bad.example"), 7, CaUrls())
    assert refused.value.reason == "cert.sign_failed"
    # Another CA's key: a valid signature, but not this CA's.
    other = LeafSigner(SoftwareSigner(ec.generate_private_key(ec.SECP256R1())), spki)
    with pytest.raises(Internal):
        await other.build(ca_cert, _plan("bad.example"), 8, CaUrls())


def test_with_signature_refuses_what_is_not_a_certificate() -> None:
    for junk in (b"\x04\x03abc", b"\x30\x03\x02\x01\x01", b"\x30\x85\x00\x00\x00\x00\x00"):
        with pytest.raises((ValueError, IndexError)):
            with_signature(junk, b"sig")
