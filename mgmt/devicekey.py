"""A device key made in, and used only inside, the device's TPM (`kmsctl enroll --tpm`)
or a PKCS#11 token (`kmsctl enroll --pkcs11`).

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

PKCS#11 (python-pkcs11): a sensitive, non-extractable P-256 key pair stored on the token
under a fresh label `edgekms-device-<hex>`; the client config names it by its RFC 7512
URI. A wrong PIN is PermissionDenied `device_key.pin_incorrect`, a token that is not
there FailedPrecondition `device_key.token_missing`.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from edgekms.algorithms import SignatureAlgorithm
from edgekms.clientconfig import ClientConfig
from edgekms.errors import FailedPrecondition, PermissionDenied
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


# -- PKCS#11 ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pkcs11Slot:
    """Where a PKCS#11 device key lives, and how to log in: the PIN is read from a file or
    an environment variable when needed, never taken from argv."""

    module: str
    token: str
    pin_file: str = ""
    pin_env: str = ""

    def pin(self) -> str:
        if self.pin_file:
            try:
                return Path(self.pin_file).read_text().strip()
            except OSError as exc:
                raise FailedPrecondition(
                    "device_key.pin_unreadable", f"cannot read the PIN file {self.pin_file}: {exc}"
                ) from None
        value = os.environ.get(self.pin_env or PIN_ENV, "")
        if not value:
            raise FailedPrecondition(
                "device_key.pin_unreadable",
                f"no PIN: give a PIN file or set {self.pin_env or PIN_ENV}",
            )
        return value


PIN_ENV = "EDGEKMS_PKCS11_PIN"
PKCS11_LABEL_PREFIX = "edgekms-device-"


def key_uri(token: str, label: str) -> str:
    """RFC 7512 URI of the private key (what the engine in edgekms.keytunnel loads)."""
    return f"pkcs11:token={quote(token, safe='')};object={quote(label, safe='')};type=private"


def uri_attribute(uri: str, attribute: str) -> str:
    """One path attribute (`token`, `object`) of a pkcs11: URI."""
    for part in uri.removeprefix("pkcs11:").partition("?")[0].split(";"):
        name, _, value = part.partition("=")
        if name == attribute:
            return unquote(value)
    raise FailedPrecondition("device_key.uri_invalid", f"{uri!r} names no {attribute}")


def slot_of(config: ClientConfig) -> Pkcs11Slot:
    """Where the key a `key_store = "pkcs11"` client config names lives."""
    return Pkcs11Slot(
        config.pkcs11_module or "",
        uri_attribute(config.key_uri, "token"),
        str(config.pin_file or ""),
        config.pin_env or "",
    )


@contextmanager
def _pkcs11_session(slot: Pkcs11Slot) -> Iterator[Any]:
    import pkcs11
    from pkcs11 import exceptions as p11err

    pin = slot.pin()
    try:
        lib = pkcs11.lib(slot.module)
    except Exception as exc:
        raise FailedPrecondition(
            "device_key.module_unusable", f"cannot load PKCS#11 module {slot.module}: {exc}"
        ) from None
    try:
        token = lib.get_token(token_label=slot.token)
    except (p11err.NoSuchToken, p11err.TokenNotPresent, p11err.TokenNotRecognised):
        raise FailedPrecondition(
            "device_key.token_missing",
            f"no PKCS#11 token labelled {slot.token!r} in {slot.module}",
            {"token": slot.token},
        ) from None
    try:
        session = token.open(rw=True, user_pin=pin)
    except (p11err.PinIncorrect, p11err.PinInvalid, p11err.PinLenRange):
        raise PermissionDenied(
            "device_key.pin_incorrect", f"the PIN for token {slot.token!r} is wrong"
        ) from None
    except p11err.PinLocked:
        raise PermissionDenied(
            "device_key.pin_locked", f"token {slot.token!r} is locked (too many wrong PINs)"
        ) from None
    try:
        yield session
    finally:
        session.close()


def create_pkcs11_key(slot: Pkcs11Slot) -> tuple[str, ec.EllipticCurvePublicKey]:
    """(label, public key) of a new P-256 key made in the token: sensitive, never
    extractable, stored on the token under a fresh label."""
    from pkcs11 import Attribute, KeyType
    from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

    label = PKCS11_LABEL_PREFIX + secrets.token_hex(8)
    with _pkcs11_session(slot) as session:
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            local=True,
        )  # fmt: skip
        public, _ = params.generate_keypair(
            store=True,
            label=label,
            id=label.encode(),
            private_template={
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.SIGN: True,
            },
        )
        der = encode_ec_public_key(public)
    loaded = serialization.load_der_public_key(der)
    assert isinstance(loaded, ec.EllipticCurvePublicKey)
    return label, loaded


def delete_pkcs11_key(slot: Pkcs11Slot, label: str) -> None:
    """Destroy both halves of the key `label` (a refused enrollment, a replaced key)."""
    from pkcs11 import Attribute

    with _pkcs11_session(slot) as session:
        for obj in list(session.get_objects({Attribute.LABEL: label})):
            obj.destroy()


class Pkcs11Signer:
    """A DigestSigner over the token's key `label` (ECDSA on a SHA-256 digest)."""

    def __init__(self, slot: Pkcs11Slot, label: str) -> None:
        self.slot = slot
        self.label = label

    def sign_digest(self, algorithm: SignatureAlgorithm, data: bytes) -> bytes:
        from pkcs11 import KeyType, Mechanism, ObjectClass

        if algorithm not in _SUPPORTED:
            raise FailedPrecondition(
                "device_key.algorithm_unsupported", f"the device key cannot do {algorithm}"
            )
        with _pkcs11_session(self.slot) as session:
            key = session.get_key(
                object_class=ObjectClass.PRIVATE_KEY, key_type=KeyType.EC, label=self.label
            )
            raw = key.sign(data, mechanism=Mechanism.ECDSA)
        half = len(raw) // 2
        return encode_dss_signature(
            int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
        )


def pkcs11_private_key(
    slot: Pkcs11Slot, label: str, public: ec.EllipticCurvePublicKey
) -> RemoteKey:
    """A cryptography private-key object signing in the token (for the CSR)."""
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return remote_key(Pkcs11Signer(slot, label), der)
