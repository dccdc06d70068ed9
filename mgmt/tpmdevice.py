"""The device's half of TPM-attested enrollment: what its own TPM does (tpm2-pytss).

* the endorsement key (EK): the TCG EK Credential Profile's RSA 2048 template (low
  range), recreated from the endorsement seed, and its certificate from NV index
  0x01c00002 where the manufacturer (or `swtpm_setup --create-ek-cert`) put it;
* the attestation key (AK): the restricted ECDSA P-256 signing primary of the endorsement
  hierarchy, the same template as the TPM crypto service's (crypto_service/providers/tpm2.py),
  so it is the same key for the life of the TPM;
* TPM2_ActivateCredential: the EK decrypts the server's challenge only if the AK named
  in it is loaded in this same TPM (the EK's policy is PolicySecret(endorsement));
* the device key: an ECC P-256 signing key under the owner hierarchy's storage primary
  (fixedTPM, fixedParent, sensitiveDataOrigin: it never leaves the TPM), made exactly as
  `kmsctl enroll --tpm` makes its key (tpm2-pytss TSSPrivKey: the parent is the primary
  that tpm2-openssl re-derives for parent 0x40000001), so the certified key is kept as a
  `TSS2 PRIVATE KEY` PEM and serves mutual TLS through edgekms.keytunnel; and
  TPM2_Certify of it by the AK over the nonce.

One ESAPI context per `DeviceTpm`; swtpm serves one client at a time, so hold it briefly.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_RH, TPM2_SE, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_AUTH,
    TPM2B_DATA,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPML_PCR_SELECTION,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
)
from tpm2_pytss.utils import NVReadEK, create_ek_template

from edgekms.errors import FailedPrecondition, Unavailable

EK_TEMPLATE = "EK-RSA2048"
OPEN_RETRY_S = 5.0
EK_CERT_INDEX = 0x01C00002

_AK_ATTRS = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.NODA
)


def ak_template() -> Any:
    return TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=_AK_ATTRS)


def _der_signature(sig: Any) -> bytes:
    r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
    s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
    return encode_dss_signature(r, s)


@dataclass(frozen=True)
class Evidence:
    """What the device sends: EK certificate (may be empty), EK and AK public areas."""

    ek_certificate_der: bytes
    ek_public: bytes
    ak_public: bytes


@dataclass(frozen=True)
class DeviceKey:
    """A TPM-wrapped device key: its public area and private blob (under the SRK)."""

    public: bytes
    private: bytes

    def _tss(self) -> Any:
        from tpm2_pytss.tsskey import TSSPrivKey

        public, _ = TPM2B_PUBLIC.unmarshal(_sized(self.public))
        private, _ = TPM2B_PRIVATE.unmarshal(self.private)
        return TSSPrivKey(private, public, empty_auth=True, parent=TPM2_RH.OWNER)

    def to_pem(self) -> bytes:
        """The `TSS2 PRIVATE KEY` PEM (parent 0x40000001, empty auth) that tpm2-openssl
        and mgmt.devicekey load: the device's client config points at it."""
        return bytes(self._tss().to_pem())

    @classmethod
    def from_pem(cls, data: bytes) -> DeviceKey:
        from tpm2_pytss.tsskey import TSSPrivKey

        key = TSSPrivKey.from_pem(data)
        return cls(bytes(key.public.publicArea.marshal()), bytes(key.private.marshal()))

    @classmethod
    def from_file(cls, path: Path) -> DeviceKey:
        return cls.from_pem(path.read_bytes())


class DeviceTpm:
    """The device's TPM, through one ESAPI context (a context manager)."""

    def __init__(
        self, tcti: str | None, endorsement_auth: bytes = b"", ek_template: str = EK_TEMPLATE
    ):
        self.ek_template = ek_template
        # A TPM just started (swtpm, or a resource manager at early boot) may refuse the
        # first connection; a few tries over OPEN_RETRY_S, then Unavailable.
        deadline = time.monotonic() + OPEN_RETRY_S
        while True:
            try:
                self.esys = ESAPI(tcti)
                break
            except TSS2_Exception as exc:
                if time.monotonic() >= deadline:
                    raise Unavailable(
                        "tpm.unavailable", f"cannot open the TPM ({tcti}): {exc}"
                    ) from None
                time.sleep(0.2)
        if endorsement_auth:
            self.esys.tr_set_auth(ESYS_TR.ENDORSEMENT, TPM2B_AUTH(endorsement_auth))
        self._ek: Any = None
        self._ak: Any = None
        self._ek_public = b""
        self._ak_public = b""

    def __enter__(self) -> DeviceTpm:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        for handle in (self._ek, self._ak):
            if handle is not None:
                with contextlib.suppress(TSS2_Exception):
                    self.esys.flush_context(handle)
        self._ek = self._ak = None
        self.esys.close()

    def _ek_handle(self) -> tuple[Any, bytes]:
        """The EK, loaded once per context (a primary is recreated from the seed)."""
        if self._ek is None:
            reader = NVReadEK(self.esys)
            _, template = create_ek_template(self.ek_template, reader)
            handle, public, _, _, _ = self.esys.create_primary(None, template, ESYS_TR.ENDORSEMENT)
            self._ek, self._ek_public = handle, bytes(public.publicArea.marshal())
        return self._ek, self._ek_public

    def _ak_handle(self) -> tuple[Any, bytes]:
        """The AK, loaded once per context."""
        if self._ak is None:
            handle, public, _, _, _ = self.esys.create_primary(
                None, ak_template(), ESYS_TR.ENDORSEMENT
            )
            self._ak, self._ak_public = handle, bytes(public.publicArea.marshal())
        return self._ak, self._ak_public

    def ek_certificate(self) -> bytes:
        """The EK certificate (DER) from NV, or b"" when the TPM has none."""
        try:
            nv = self.esys.tr_from_tpmpublic(EK_CERT_INDEX)
            public, _ = self.esys.nv_read_public(nv)
            size = public.nvPublic.dataSize
            out = b""
            while len(out) < size:
                chunk = min(512, size - len(out))
                out += bytes(self.esys.nv_read(nv, chunk, len(out), ESYS_TR.OWNER))
            return out
        except TSS2_Exception:
            return b""

    def evidence(self) -> Evidence:
        cert = self.ek_certificate()
        _, ek_public = self._ek_handle()
        _, ak_public = self._ak_handle()
        return Evidence(cert, ek_public, ak_public)

    def activate(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """TPM2_ActivateCredential: the challenge's secret, if it was made for this
        TPM's EK and this AK; FailedPrecondition otherwise."""
        self._ek_handle()
        self._ak_handle()
        session = self.esys.start_auth_session(
            ESYS_TR.NONE,
            ESYS_TR.NONE,
            TPM2_SE.POLICY,
            TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            TPM2_ALG.SHA256,
        )
        try:
            self.esys.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
            secret = self.esys.activate_credential(
                self._ak,
                self._ek,
                TPM2B_ID_OBJECT(credential=credential_blob),
                TPM2B_ENCRYPTED_SECRET(secret=encrypted_secret),
                session1=ESYS_TR.PASSWORD,
                session2=session,
            )
        except TSS2_Exception as exc:
            raise FailedPrecondition(
                "attest.activation_failed",
                f"this TPM cannot activate the credential (not made for its EK and AK): {exc}",
            ) from None
        finally:
            with contextlib.suppress(TSS2_Exception):
                self.esys.flush_context(session)
        return bytes(secret)

    def _flush_ek(self) -> None:
        """The EK is done with once activated; swtpm has three object slots."""
        if self._ek is not None:
            self.esys.flush_context(self._ek)
            self._ek = None

    def create_key(self) -> DeviceKey:
        """A fresh ECC P-256 signing key under the owner's storage primary, made by
        TSSPrivKey as mgmt.devicekey makes it: the same parent template (the one
        tpm2-openssl re-derives for 0x40000001) and key template, so the PEM loads there."""
        from tpm2_pytss.constants import TPM2_ECC
        from tpm2_pytss.tsskey import TSSPrivKey

        self._flush_ek()
        key = TSSPrivKey.create_ecc(self.esys, curveID=TPM2_ECC.NIST_P256)
        return DeviceKey(bytes(key.public.publicArea.marshal()), bytes(key.private.marshal()))

    def certify(self, key: DeviceKey, nonce: bytes) -> tuple[bytes, bytes]:
        """(TPMS_ATTEST, DER ECDSA signature): the AK certifies `key` over `nonce`."""
        self._ak_handle()
        self._flush_ek()
        # TSSPrivKey.load makes the parent, loads the key and flushes the parent: at most
        # three objects (AK, parent, key) are in the TPM at once.
        handle = key._tss().load(self.esys)
        try:
            scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
            info, sig = self.esys.certify(handle, self._ak, TPM2B_DATA(nonce), scheme)
        finally:
            self.esys.flush_context(handle)
        return bytes(info.marshal()[2:]), _der_signature(sig)

    def pcr_values(self, pcrs: list[int]) -> list[bytes]:
        """The sha256 bank's values of `pcrs`, in ascending PCR order."""
        return _pcr_values(self.esys, pcrs)

    def pcr_digest(self, pcrs: list[int]) -> bytes:
        """SHA-256 of the sha256 bank's `pcrs` values concatenated in ascending order: the
        digest a TPM2_Quote over them carries, and what an unlock policy records."""
        import hashlib

        return hashlib.sha256(b"".join(_pcr_values(self.esys, pcrs))).digest()

    def extend(self, pcr: int, data: bytes) -> None:
        """TPM2_PCR_Event on `pcr` (what a boot stage does when it measures the next)."""
        from tpm2_pytss.types import TPM2B_EVENT

        handle = getattr(ESYS_TR, f"PCR{pcr}")
        self.esys.pcr_event(handle, TPM2B_EVENT(data))

    def quote(self, pcrs: list[int], nonce: bytes) -> tuple[bytes, bytes]:
        """(TPMS_ATTEST, DER ECDSA signature): the AK quotes the sha256 bank's `pcrs`."""
        self._ak_handle()
        selection = TPML_PCR_SELECTION.parse("sha256:" + ",".join(str(p) for p in pcrs))
        scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
        info, sig = self.esys.quote(self._ak, selection, TPM2B_DATA(nonce), scheme)
        return bytes(info.marshal()[2:]), _der_signature(sig)


def _pcr_values(esys: Any, pcrs: list[int]) -> list[bytes]:
    """The sha256 bank's values of `pcrs`, in ascending order (TPM2_PCR_Read returns at
    most eight a call)."""
    values: list[bytes] = []
    for start in range(0, len(pcrs), 8):
        chunk = sorted(pcrs)[start : start + 8]
        selection = TPML_PCR_SELECTION.parse("sha256:" + ",".join(str(p) for p in chunk))
        _, _, digests = esys.pcr_read(selection)
        values += [bytes(d) for d in digests]
    return values


def _sized(area: bytes) -> bytes:
    return len(area).to_bytes(2, "big") + area
