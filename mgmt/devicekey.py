"""A device key made in, and used only inside, the device's TPM (`kmsctl enroll --tpm`).

The key is an EC P-256 key under the TPM's standard storage key (the owner hierarchy's
ECC SRK template, which any TPM re-derives), saved as a `TSS2 PRIVATE KEY` PEM: the
format tpm2-openssl loads, so edgekms.keytunnel can do mutual TLS with it. That file is
wrapped by the TPM and worthless off the device; the private key is never outside it.

Here the key is made and its public half read; CSRs (enrollment) are signed through
edgekms.remote_key with a DigestSigner that asks the TPM. Every TPM failure comes out as
FailedPrecondition `device_key.tpm_unavailable` (no TPM behind the TCTI, a busy or
broken one) or `device_key.tpm_key_unusable` (a blob this TPM did not make).

swtpm serves one client at a time: each function opens the TPM and closes it before it
returns, so a tunnel started afterwards can hold it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from edgekms.algorithms import SignatureAlgorithm
from edgekms.errors import FailedPrecondition
from edgekms.keytunnel import DEFAULT_TCTI, tcti_of
from edgekms.remote_key import RemoteKey, remote_key
from edgekms.v1 import common_pb2 as pb

T = TypeVar("T")
TPM_KEY_FILE = "device.tss2.pem"
# What the TPM signs: ECDSA over a SHA-256 digest (CSRs are built with SHA-256).
_SUPPORTED = frozenset({pb.SIGNATURE_ALGORITHM_ECDSA_SHA256})


@contextmanager
def _esapi(tcti: str) -> Iterator[Any]:
    from tpm2_pytss import ESAPI, TSS2_Exception

    try:
        esys = ESAPI(tcti_of(tcti))
    except (TSS2_Exception, Exception) as exc:
        raise FailedPrecondition(
            "device_key.tpm_unavailable",
            f"no TPM reachable through {tcti!r}: {exc}",
            {"tcti": tcti},
        ) from None
    try:
        yield esys
    finally:
        esys.close()


def _guard(tcti: str, fn: Callable[[Any], T]) -> T:
    from tpm2_pytss import TSS2_Exception

    with _esapi(tcti) as esys:
        try:
            return fn(esys)
        except TSS2_Exception as exc:
            raise FailedPrecondition(
                "device_key.tpm_key_unusable",
                f"the TPM behind {tcti!r} refused the device key: {exc}",
                {"tcti": tcti},
            ) from None


def _public_of(key: Any) -> ec.EllipticCurvePublicKey:
    ecc = key.public.publicArea.unique.ecc
    x = int.from_bytes(bytes(ecc.x), "big")
    y = int.from_bytes(bytes(ecc.y), "big")
    return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()


def create_tpm_key(tcti: str = DEFAULT_TCTI) -> tuple[bytes, ec.EllipticCurvePublicKey]:
    """(TSS2 PEM blob, public key) of a new P-256 key made in the TPM."""
    from tpm2_pytss.constants import TPM2_ECC
    from tpm2_pytss.tsskey import TSSPrivKey

    def make(esys: Any) -> tuple[bytes, ec.EllipticCurvePublicKey]:
        key = TSSPrivKey.create_ecc(esys, curveID=TPM2_ECC.NIST_P256)
        return bytes(key.to_pem()), _public_of(key)

    return _guard(tcti, make)


def tpm_public_key(blob: bytes) -> ec.EllipticCurvePublicKey:
    """The public half recorded in a TSS2 PEM blob (no TPM needed)."""
    from tpm2_pytss.tsskey import TSSPrivKey

    try:
        return _public_of(TSSPrivKey.from_pem(blob))
    except Exception as exc:
        raise FailedPrecondition(
            "device_key.tpm_key_unusable", f"not a TSS2 private key blob: {exc}"
        ) from None


class TpmSigner:
    """A DigestSigner that loads the blob into the TPM for each signature."""

    def __init__(self, blob: bytes, tcti: str = DEFAULT_TCTI) -> None:
        self.blob = blob
        self.tcti = tcti

    def sign_digest(self, algorithm: SignatureAlgorithm, data: bytes) -> bytes:
        from tpm2_pytss.constants import TPM2_ALG, TPM2_RH, TPM2_ST
        from tpm2_pytss.tsskey import TSSPrivKey
        from tpm2_pytss.types import TPM2B_DIGEST, TPMT_SIG_SCHEME, TPMT_TK_HASHCHECK

        if algorithm not in _SUPPORTED:
            raise FailedPrecondition(
                "device_key.algorithm_unsupported", f"the TPM device key cannot do {algorithm}"
            )

        def sign(esys: Any) -> bytes:
            handle = TSSPrivKey.from_pem(self.blob).load(esys)
            try:
                scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
                scheme.details.any.hashAlg = TPM2_ALG.SHA256
                ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
                sig = esys.sign(handle, TPM2B_DIGEST(data), scheme, ticket)
            finally:
                esys.flush_context(handle)
            r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
            s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
            return encode_dss_signature(r, s)

        return _guard(self.tcti, sign)


def tpm_private_key(blob: bytes, tcti: str = DEFAULT_TCTI) -> RemoteKey:
    """A cryptography private-key object whose every signature is made in the TPM (for
    CSRs: `builder.sign(tpm_private_key(blob), hashes.SHA256())`)."""
    der = tpm_public_key(blob).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return remote_key(TpmSigner(blob, tcti), der)


def read_blob(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise FailedPrecondition(
            "device_key.tpm_key_unusable", f"cannot read the TPM key file {path}: {exc}"
        ) from None
