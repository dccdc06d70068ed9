"""The TPM 2.0 provider: signing keys held by a TPM (a board's /dev/tpmrm0, swtpm here).

How keys live
-------------
* A storage primary key (SRK) is the parent of every key: either the ECC P-256 storage
  template of the TCG provisioning guide, created afresh under the owner hierarchy at
  connect time (deterministic: the same seed gives the same key after every reboot), or an
  existing persistent SRK (config `srk_handle`, usually 0x81000001).
* Signing keys are ordinary (unrestricted, scheme NULL) children of the SRK: EC P-256/P-384,
  RSA 2048 and RSA 3072 where the TPM has it (TPM2_TestParms decides). Each is
  fixedTPM|fixedParent|sensitiveDataOrigin, so its private half was made inside this TPM
  and never leaves it. The TPM returns a public area and a private blob wrapped by the
  SRK; the service keeps both in one JSON file per key in `state_dir`, named by the key id
  in hex, written atomically (tmp, fsync, rename, fsync dir; mode 0600). Without its file
  a key does not exist; with it, it is complete.
* Signing keeps the last LOADED_KEYS_MAX keys loaded (an LRU of their handles), so a
  repeated sign is one TPM command instead of three (load, sign, flush). Every other
  operation (generate, attest, the AK) first flushes that cache and flushes what it loads
  in a `finally`, so the TPM's few object slots (three on swtpm: transient SRK + two
  cached keys) never fill up (TPM_RC_OBJECT_MEMORY, 0x902); a load that still meets 0x902
  flushes the cache and tries once more.
* One TPM command at a time: every ESAPI call runs on the single thread of a one-worker
  executor, whose queue orders the callers. The ESAPI context never leaves that thread.

Authorisation
-------------
* `require_auth`: the key's authValue is the content of the file `key_auth_file` names
  (one trailing newline dropped, 1 to 32 bytes). It is read at every use, never logged.
  Such keys are subject to the TPM's dictionary-attack protection; keys without an auth
  value are created noDA (nothing to guess, nothing to lock out).
* `pcr_indexes`: the key's authPolicy is PolicyPCR over the sha256 bank of those PCRs
  with the values they had at creation (and PolicyAuthValue too when an auth value is
  required); userWithAuth is cleared, so a password alone cannot use the key, and once one
  of those PCRs changes the policy digest no longer matches and the TPM refuses to sign.
  adminWithPolicy stays clear, so TPM2_Certify (an ADMIN-role use) still works through
  the authValue and a PCR-bound key can be attested.

Attestation
-----------
The attestation key (AK) is a restricted ECDSA P-256/SHA-256 signing primary in the
endorsement hierarchy: derived from the endorsement seed, so it is the same key for the
life of this TPM and pins the device. TPM2_Certify makes the AK sign a TPMS_ATTEST that
names the signing key; a restricted key signs only TPM-made structures (they start with
TPM_GENERATED_VALUE), so the evidence cannot be forged through the AK. mgmt.attestation
checks it.

Hierarchy auth
--------------
After `kmsctl tpm provision` the owner and endorsement hierarchies have auth values; the
config's `owner_auth_file` and `endorsement_auth_file` name them, and they are set on the
ESAPI context at every connect (read then, never logged). A wrong or missing one makes
the connect fail with PermissionDenied("tpm.hierarchy_auth_failed").

Errors
------
TPM absent or unreachable: Unavailable("tpm.unavailable", naming the TCTI; the next call
reconnects). Wrong auth value (0x98E): PermissionDenied("tpm.auth_failed"). Lockout
(0x921): FailedPrecondition("tpm.lockout", details with seconds to wait). Policy not
satisfied: FailedPrecondition("tpm.policy_failed").
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_HC,
    TPM2_PT,
    TPM2_RC,
    TPM2_RH,
    TPM2_SE,
    TPM2_ST,
    TPMA_OBJECT,
    TSS2_RC,
)
from tpm2_pytss.types import (
    TPM2_HANDLE,
    TPM2B_AUTH,
    TPM2B_DIGEST,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_PCR_SELECTION,
    TPMS_SENSITIVE_CREATE,
    TPMT_PUBLIC_PARMS,
    TPMT_RSA_DECRYPT,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMT_TK_HASHCHECK,
)

from crypto_service.providers import oaep
from crypto_service.providers.base import (
    Attestation,
    GeneratedKey,
    KeyCreateOptions,
    Sealed,
    StoredKey,
    check_key_class,
    legacy_key_class,
)
from edgekms.algorithms import (
    KEY_TYPE_BY_CLI,
    EncryptionAlgorithm,
    KeyType,
    SignatureAlgorithm,
    check_sign_request,
    key_type_info,
    key_usage,
)
from edgekms.envelope import oaep_label
from edgekms.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    KMSError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from edgekms.subjects import KEY_CLASSES
from edgekms.v1 import common_pb2 as pb

if TYPE_CHECKING:
    from crypto_service.config import Tpm2Config

log = logging.getLogger(__name__)

T = TypeVar("T")

RECORD_VERSION = 1
RECORD_SUFFIX = ".key"
MAX_AUTH_SIZE = 32  # sha256 nameAlg: the TPM refuses longer authValues
MAX_NONCE_SIZE = 64
PCR_COUNT = 24
_TSS2_LAYER_TCTI = 10
_TSS2_LAYER_RESMGR = 11  # tabrmd and the kernel RM report their own transport failures
_KEY_ID_RE = re.compile(r"^[0-9a-f]{2,128}$")
# Loaded signing keys kept between signs. Two, because swtpm (and the minimum of the PC
# Client spec) has three object slots and the transient SRK holds one; a load under a
# persistent SRK borrows a slot for the SRK during the command, which the LRU's eviction
# before each load leaves free.
LOADED_KEYS_MAX = 2
# What a cached handle the TPM (or ESAPI) no longer knows, flushed behind our back, looks like.
_STALE_HANDLE_RCS = (TPM2_RC.HANDLE, TPM2_RC.REFERENCE_H0, TPM2_RC.VALUE)

# Template names for TPM2B_PUBLIC.parse, per key type the TPM may hold.
_TEMPLATES: dict[KeyType, str] = {
    pb.KEY_TYPE_EC_P256: "ecc256:null",
    pb.KEY_TYPE_EC_P384: "ecc384:null",
    pb.KEY_TYPE_RSA_2048: "rsa2048:null",
    pb.KEY_TYPE_RSA_3072: "rsa3072:null",
    pb.KEY_TYPE_RSA_4096: "rsa4096:null",
}
# AES-256 keys: the TPM's own AES (TPM2_EncryptDecrypt2) has no AEAD mode (CFB, CBC, CTR,
# OFB, ECB only) and is optional in the PC Client profile, so an "aes-256" key in a TPM
# is a keyed-hash (HMAC-SHA256) object under the SRK, non-exportable like every key
# here. Each Encrypt draws a 32-byte random salt, has the TPM compute the one-time key
# HMAC(K, AEAD_CONTEXT || salt), and seals with AES-256-GCM under it (a zero nonce: the
# key is used for one message only). The salt travels as the envelope's nonce.
_HMAC_TEMPLATE = "hmac:sha256"
AEAD_CONTEXT = b"edgekms-tpm-aead-v1\x00"
AEAD_SALT = 32
_ZERO_NONCE = bytes(12)
_HASH_ALG = {"sha256": TPM2_ALG.SHA256, "sha384": TPM2_ALG.SHA384, "sha512": TPM2_ALG.SHA512}

_KEY_ATTRS = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.SIGN_ENCRYPT
)
_SRK_ATTRS = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.DECRYPT
    | TPMA_OBJECT.NODA
)
_AK_ATTRS = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.NODA
)


def _oaep(label: bytes) -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=label)


def srk_template() -> Any:
    return TPM2B_PUBLIC.parse("ecc256:aes128cfb", objectAttributes=_SRK_ATTRS)


def ak_template() -> Any:
    return TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=_AK_ATTRS)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _key_hex(key_id: bytes) -> str:
    if not isinstance(key_id, bytes) or not 1 <= len(key_id) <= 64:
        raise InvalidArgument("key.id_invalid", "a key id is 1 to 64 bytes")
    return key_id.hex()


class Tpm2Provider:
    """Keys in a TPM 2.0 reached through a TCTI (`device:…`, `swtpm:…`, `tabrmd`)."""

    kind = "tpm2"

    def __init__(self, config: Tpm2Config) -> None:
        self.config = config
        self.tcti = config.tcti
        self.state_dir = Path(config.state_dir)
        self.srk_handle: int | None = config.srk_handle
        auth_file = config.key_auth_file
        self.key_auth_file: Path | None = Path(auth_file) if auth_file else None
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tpm2", initializer=self._on_tpm_thread
        )
        self._thread_id: int | None = None
        # key id -> (the record file's identity, its parsed content): a sign stats the file
        # (a destroyed key is gone at once, from any process) but does not re-read it.
        self._records: dict[bytes, tuple[tuple[int, int, int], dict[str, Any]]] = {}
        self._closed = False
        self._close_lock = threading.Lock()
        # Touched only on the executor's thread:
        self._esys: Any = None
        self._srk: Any = None
        self._key_types: frozenset[KeyType] | None = None
        # (key id, private blob) -> loaded ESYS_TR, least recently used first.
        self._loaded: OrderedDict[tuple[bytes, str], Any] = OrderedDict()
        # Connect now, so a wrong TCTI or an absent TPM shows at service start.
        self._run("connect", lambda esys: None)

    # ---- the queue -------------------------------------------------------------------

    def _on_tpm_thread(self) -> None:
        self._thread_id = threading.get_ident()

    def _run(self, op: str, fn: Callable[[Any], T], key_id: bytes | None = None) -> T:
        if self._closed:
            raise Unavailable("tpm.closed", "the TPM provider is closed")
        if threading.get_ident() == self._thread_id:
            return self._guarded(op, fn, key_id)  # inside run_serially: already there
        return self._executor.submit(self._guarded, op, fn, key_id).result()

    def run_serially(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the TPM thread (providers.base.RunsSerially): the crypto service
        signs a whole batch in one hand-off; each sign inside runs directly."""
        if self._closed:
            raise Unavailable("tpm.closed", "the TPM provider is closed")
        if threading.get_ident() == self._thread_id:
            return fn()
        return self._executor.submit(fn).result()

    def _guarded(self, op: str, fn: Callable[[Any], T], key_id: bytes | None) -> T:
        if self._esys is None:
            self._connect()
        try:
            return fn(self._esys)
        except TSS2_Exception as exc:
            raise self._map_error(exc, op, key_id) from None

    def _connect(self) -> None:
        try:
            esys = ESAPI(self.tcti)
        except TSS2_Exception as exc:
            log.warning("tpm connect failed tcti=%s rc=0x%x", self.tcti, exc.rc)
            raise Unavailable(
                "tpm.unavailable",
                f"no TPM reachable through TCTI {self.tcti!r}: {exc}",
                {"tcti": self.tcti},
            ) from None
        except Exception as exc:  # a TCTI string the loader cannot parse
            raise Unavailable(
                "tpm.unavailable",
                f"TCTI {self.tcti!r} could not be opened: {exc}",
                {"tcti": self.tcti},
            ) from None
        try:
            self._esys = esys
            self._set_hierarchy_auth(esys)
            self._flush_stale(esys)
            self._srk = self._open_srk(esys)
            if self._key_types is None:
                self._key_types = self._probe_key_types(esys)
        except TSS2_Exception as exc:
            self._drop_connection()
            if exc.error in (TPM2_RC.AUTH_FAIL, TPM2_RC.BAD_AUTH):
                raise PermissionDenied(
                    "tpm.hierarchy_auth_failed",
                    "the TPM refused the owner auth value: configure owner_auth_file with"
                    " the value `kmsctl tpm provision` stored",
                    {"tcti": self.tcti},
                ) from None
            raise self._map_error(exc, "connect", None) from None
        except KMSError:
            self._drop_connection()
            raise
        log.info(
            "tpm connected tcti=%s srk=%s key_types=%s",
            self.tcti,
            hex(self.srk_handle) if self.srk_handle else "transient",
            ",".join(key_type_info(k).cli_name for k in sorted(self._key_types or ())),
        )

    def _set_hierarchy_auth(self, esys: Any) -> None:
        for handle, path in (
            (ESYS_TR.OWNER, self.config.owner_auth_file),
            (ESYS_TR.ENDORSEMENT, self.config.endorsement_auth_file),
        ):
            if path is None:
                continue
            try:
                value = Path(path).read_bytes()
            except OSError as exc:
                raise FailedPrecondition(
                    "tpm.hierarchy_auth_unreadable",
                    f"cannot read hierarchy auth file {path}: {exc.strerror or exc}",
                    {"path": str(path)},
                ) from None
            if value.endswith(b"\n"):
                value = value[:-1]
            esys.tr_set_auth(handle, TPM2B_AUTH(value))

    def auth_fail_limits(self) -> tuple[int, float]:
        """(max_tries, seconds per forgiven failure) as this TPM is set, for the guard."""

        def read(esys: Any) -> tuple[int, float]:
            _, data = esys.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.MAX_AUTH_FAIL, 2)
            props = {int(p.property): int(p.value) for p in data.data.tpmProperties}
            return props[int(TPM2_PT.MAX_AUTH_FAIL)], float(props[int(TPM2_PT.LOCKOUT_INTERVAL)])

        return self._run("auth_fail_limits", read)

    def _drop_connection(self) -> None:
        self._loaded.clear()  # handles die with the connection (and _flush_stale cleans up)
        esys, self._esys, self._srk = self._esys, None, None
        if esys is not None:
            with contextlib.suppress(Exception):  # the transport may already be gone
                esys.close()

    @staticmethod
    def _flush_stale(esys: Any) -> None:
        """Flush transient objects and sessions left by a process that died mid-command.

        Without a resource manager (swtpm, /dev/tpm0) they would hold the TPM's few
        slots forever; behind one (/dev/tpmrm0, tabrmd) we see only our own, so this is
        always safe for a provider that owns its connection.
        """
        for first in (TPM2_HC.TRANSIENT_FIRST, TPM2_HC.LOADED_SESSION_FIRST):
            _, data = esys.get_capability(TPM2_CAP.HANDLES, first, 64)
            for handle in data.data.handles:
                try:
                    tr = esys.tr_from_tpmpublic(TPM2_HANDLE(handle))
                    esys.flush_context(tr)
                    log.info("tpm flushed stale handle=0x%x", int(handle))
                except TSS2_Exception as exc:
                    log.warning("tpm could not flush handle=0x%x rc=0x%x", int(handle), exc.rc)

    def _open_srk(self, esys: Any) -> Any:
        if self.srk_handle is not None:
            try:
                return esys.tr_from_tpmpublic(TPM2_HANDLE(self.srk_handle))
            except TSS2_Exception as exc:
                if exc.error in (TPM2_RC.HANDLE, TPM2_RC.REFERENCE_H0):
                    raise FailedPrecondition(
                        "tpm.srk_missing",
                        f"no persistent storage key at {self.srk_handle:#x} in this TPM",
                        {"handle": hex(self.srk_handle)},
                    ) from None
                raise
        handle, _pub, _, _, _ = esys.create_primary(None, srk_template(), ESYS_TR.OWNER)
        return handle

    @staticmethod
    def _probe_key_types(esys: Any) -> frozenset[KeyType]:
        found: set[KeyType] = {pb.KEY_TYPE_AES_256}  # HMAC-SHA256: every TPM 2.0 has it
        for key_type, spec in _TEMPLATES.items():
            area = TPM2B_PUBLIC.parse(spec, objectAttributes=_KEY_ATTRS).publicArea
            try:
                esys.test_parms(TPMT_PUBLIC_PARMS(type=area.type, parameters=area.parameters))
            except TSS2_Exception:
                continue
            found.add(key_type)
        return frozenset(found)

    def _map_error(self, exc: TSS2_Exception, op: str, key_id: bytes | None) -> KMSError:
        rc = int(exc.rc)
        layer = (rc >> 16) & 0xFF
        details = {"op": op, "rc": f"0x{rc:x}", "tcti": self.tcti}
        where = f" (key {key_id.hex()})" if key_id else ""
        if layer in (_TSS2_LAYER_TCTI, _TSS2_LAYER_RESMGR) or exc.error == TPM2_RC.FAILURE:
            # The transport broke: start a fresh ESAPI context on the next call.
            self._drop_connection()
            log.warning("tpm unreachable op=%s tcti=%s rc=0x%x", op, self.tcti, rc)
            return Unavailable(
                "tpm.unavailable", f"the TPM at {self.tcti!r} stopped answering: {exc}", details
            )
        err = exc.error
        if err == TPM2_RC.LOCKOUT:
            return self._lockout_error(details)
        if err in (TPM2_RC.AUTH_FAIL, TPM2_RC.BAD_AUTH):
            log.warning("tpm auth failed op=%s key_id=%s", op, key_id.hex() if key_id else "-")
            return PermissionDenied(
                "tpm.auth_failed", f"the TPM refused the key's auth value{where}", details
            )
        if err in (TPM2_RC.POLICY_FAIL, TPM2_RC.PCR_CHANGED, TPM2_RC.POLICY_CC):
            return FailedPrecondition(
                "tpm.policy_failed",
                f"the key's policy is not satisfied{where}: its PCRs no longer hold the"
                " values it was bound to",
                details,
            )
        if err == TPM2_RC.OBJECT_MEMORY or err == TPM2_RC.SESSION_MEMORY:
            return ResourceExhausted(
                "tpm.out_of_slots", f"the TPM has no free slot: {exc}", details
            )
        if err in (TPM2_RC.RETRY, TPM2_RC.YIELDED, TPM2_RC.TESTING):
            return Unavailable("tpm.busy", f"the TPM is busy, try again: {exc}", details)
        if err == TPM2_RC.INTEGRITY:
            return FailedPrecondition(
                "tpm.blob_rejected",
                f"the TPM rejected the key's blob{where}: made by another TPM or another SRK",
                details,
            )
        log.error("tpm error op=%s rc=0x%x", op, rc)
        return Internal("tpm.error", f"TPM {op} failed: {exc}", details)

    def _lockout_error(self, details: dict[str, str]) -> FailedPrecondition:
        """0x921: how long until the TPM forgives enough failures to leave lockout."""
        props: dict[int, int] = {}
        try:
            _, data = self._esys.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.LOCKOUT_COUNTER, 4)
            props = {int(p.property): int(p.value) for p in data.data.tpmProperties}
        except TSS2_Exception:
            pass
        counter = props.get(int(TPM2_PT.LOCKOUT_COUNTER), 0)
        max_tries = props.get(int(TPM2_PT.MAX_AUTH_FAIL), 0)
        interval = props.get(int(TPM2_PT.LOCKOUT_INTERVAL), 0)
        recovery = props.get(int(TPM2_PT.LOCKOUT_RECOVERY), 0)
        # The counter drops by one every `interval` seconds; lockout ends below max_tries.
        wait = interval * max(1, counter - max_tries + 1) if interval else 0
        details = {
            **details,
            "retry_after_seconds": str(wait),
            "lockout_counter": str(counter),
            "max_tries": str(max_tries),
            "lockout_interval_seconds": str(interval),
            "lockout_recovery_seconds": str(recovery),
        }
        how = f"wait up to {wait} s" if wait else "only a lockout-hierarchy reset can clear it"
        log.warning("tpm lockout counter=%s max_tries=%s wait=%s", counter, max_tries, wait)
        return FailedPrecondition(
            "tpm.lockout",
            f"the TPM is in dictionary-attack lockout after {counter} wrong auth values; {how}",
            details,
        )

    # ---- state files -----------------------------------------------------------------

    def _path(self, key_id: bytes) -> Path:
        return self.state_dir / (_key_hex(key_id) + RECORD_SUFFIX)

    def _read_record(self, key_id: bytes) -> dict[str, Any]:
        path = self._path(key_id)
        try:
            st = path.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            cached = self._records.get(key_id)
            if cached is not None and cached[0] == stamp:
                return cached[1]
            record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            self._records.pop(key_id, None)
            raise NotFound("key.not_found", f"no TPM key {key_id.hex()}") from None
        except (OSError, ValueError) as exc:
            raise Internal("tpm.state_corrupt", f"{path}: unreadable key record: {exc}") from None
        self._records[key_id] = (stamp, record)
        return record

    def _write_record(self, key_id: bytes, record: dict[str, Any]) -> None:
        path = self._path(key_id)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        data = json.dumps(record, sort_keys=True).encode("utf-8")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            # link() fails if the name exists, so two creates of one id cannot both win.
            os.link(tmp, path)
        except FileExistsError:
            raise AlreadyExists("key.id_exists", f"TPM key {key_id.hex()} already exists") from None
        finally:
            tmp.unlink(missing_ok=True)
        self._fsync_dir()

    def _fsync_dir(self) -> None:
        dfd = os.open(self.state_dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _auth_value(self) -> bytes:
        if self.key_auth_file is None:
            raise FailedPrecondition(
                "tpm.auth_unconfigured",
                "this key needs an auth value but [tpm2] key_auth_file is not set",
            )
        try:
            value = self.key_auth_file.read_bytes()
        except OSError as exc:
            raise FailedPrecondition(
                "tpm.auth_unreadable",
                f"cannot read the key auth file {self.key_auth_file}: {exc.strerror or exc}",
            ) from None
        if value.endswith(b"\n"):
            value = value[:-1]
        if not 1 <= len(value) <= MAX_AUTH_SIZE:
            raise FailedPrecondition(
                "tpm.auth_invalid",
                f"the key auth value in {self.key_auth_file} must be 1 to {MAX_AUTH_SIZE} bytes",
            )
        return value

    # ---- Provider --------------------------------------------------------------------

    def key_types(self) -> frozenset[KeyType]:
        if self._key_types is None:
            self._run("key_types", lambda esys: None)
        return self._key_types or frozenset()

    def generate(
        self, key_id: bytes, label: str, key_type: KeyType, options: KeyCreateOptions
    ) -> GeneratedKey:
        info = key_type_info(key_type)
        _key_hex(key_id)
        if key_type not in self.key_types():
            raise FailedPrecondition(
                "provider.key_type_unsupported",
                f"this TPM cannot hold {info.cli_name} keys",
                {"key_type": info.cli_name, "provider": self.kind},
            )
        pcrs = tuple(options.pcr_indexes)
        if len(set(pcrs)) != len(pcrs) or any(not 0 <= i < PCR_COUNT for i in pcrs):
            raise InvalidArgument(
                "tpm.pcr_invalid", f"PCR indexes must be distinct and 0..{PCR_COUNT - 1}"
            )
        if self._path(key_id).exists():
            raise AlreadyExists("key.id_exists", f"TPM key {key_id.hex()} already exists")
        auth = self._auth_value() if options.require_auth else b""

        def create(esys: Any) -> tuple[bytes, bytes, bytes]:
            self._flush_loaded(esys)  # TPM2_Create needs a free object slot
            attrs = _KEY_ATTRS
            if not auth:
                attrs |= TPMA_OBJECT.NODA
            policy = b""
            if pcrs:
                policy = self._trial_policy(esys, pcrs, bool(auth))
            else:
                attrs |= TPMA_OBJECT.USERWITHAUTH
            if key_type == pb.KEY_TYPE_AES_256:
                spec = _HMAC_TEMPLATE
            else:
                spec = _TEMPLATES[key_type]
                if key_usage(key_type, options.usage) == pb.KEY_USAGE_ENCRYPT_DECRYPT:
                    # An RSA key that decrypts (OAEP) and cannot sign.
                    attrs = (attrs & ~TPMA_OBJECT.SIGN_ENCRYPT) | TPMA_OBJECT.DECRYPT
            template = TPM2B_PUBLIC.parse(spec, objectAttributes=attrs, authPolicy=policy)
            sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(userAuth=TPM2B_AUTH(auth)))
            private, public, _, _, _ = esys.create(self._srk, sensitive, template)
            spki = b"" if key_type == pb.KEY_TYPE_AES_256 else public.publicArea.to_der()
            return public.marshal(), private.marshal(), spki

        log.info(
            "tpm generate key_id=%s key_type=%s pcrs=%s require_auth=%s",
            key_id.hex(),
            info.cli_name,
            ",".join(map(str, pcrs)) or "-",
            bool(auth),
        )
        public, private, spki = self._run("generate", create, key_id)
        record = {
            "version": RECORD_VERSION,
            "key_id": key_id.hex(),
            "label": label,
            "key_type": info.cli_name,
            "public": _b64(public),
            "private": _b64(private),
            "require_auth": bool(auth),
            "pcr_indexes": list(pcrs),
            "srk_handle": self.srk_handle,
            # The key's class (docs/security.md, "Keys bound to their owners"): this file
            # is the crypto service's own, so the class cannot be changed by a caller.
            "key_class": check_key_class(options.key_class),
            "usage": int(key_usage(key_type, options.usage)),
        }
        self._write_record(key_id, record)
        return GeneratedKey(key_id=key_id, public_key_der=spki)

    @staticmethod
    def _pcr_selection(pcrs: tuple[int, ...]) -> Any:
        return TPML_PCR_SELECTION.parse("sha256:" + ",".join(str(i) for i in sorted(pcrs)))

    def _trial_policy(self, esys: Any, pcrs: tuple[int, ...], with_auth: bool) -> bytes:
        """The policy digest a key is created with: the same policy run in a trial
        session, which computes the digest without checking anything."""
        session = self._pcr_session(esys, TPM2_SE.TRIAL, pcrs, with_auth)
        try:
            return bytes(esys.policy_get_digest(session))
        finally:
            esys.flush_context(session)

    def _policy_session(self, esys: Any, pcrs: tuple[int, ...], with_auth: bool) -> Any:
        """A real policy session for one use of the key; the caller flushes it."""
        return self._pcr_session(esys, TPM2_SE.POLICY, pcrs, with_auth)

    def _pcr_session(self, esys: Any, kind: Any, pcrs: tuple[int, ...], with_auth: bool) -> Any:
        """A session of `kind` with the key policy applied: the PCR values, and the
        key's auth value if it has one. Flushed here if building it fails."""
        session = esys.start_auth_session(
            ESYS_TR.NONE,
            ESYS_TR.NONE,
            kind,
            TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            TPM2_ALG.SHA256,
        )
        try:
            esys.policy_pcr(session, TPM2B_DIGEST(), self._pcr_selection(pcrs))
            if with_auth:
                esys.policy_auth_value(session)
        except BaseException:
            esys.flush_context(session)
            raise
        return session

    def _load(self, esys: Any, record: dict[str, Any]) -> Any:
        public, _ = TPM2B_PUBLIC.unmarshal(_unb64(record["public"]))
        private, _ = TPM2B_PRIVATE.unmarshal(_unb64(record["private"]))
        return esys.load(self._srk, private, public)

    def _loaded_handle(self, esys: Any, key_id: bytes, record: dict[str, Any]) -> tuple[Any, bool]:
        """The key's loaded handle, from the LRU or freshly loaded; (handle, was_cached)."""
        cache_key = (key_id, str(record["private"]))
        handle = self._loaded.get(cache_key)
        if handle is not None:
            self._loaded.move_to_end(cache_key)
            return handle, True
        while len(self._loaded) >= LOADED_KEYS_MAX:
            self._evict(esys, next(iter(self._loaded)))
        try:
            handle = self._load(esys, record)
        except TSS2_Exception as exc:
            if exc.error != TPM2_RC.OBJECT_MEMORY or not self._loaded:
                raise
            self._flush_loaded(esys)
            handle = self._load(esys, record)
        self._loaded[cache_key] = handle
        return handle, False

    def _evict(self, esys: Any, cache_key: tuple[bytes, str]) -> None:
        handle = self._loaded.pop(cache_key, None)
        if handle is not None:
            with contextlib.suppress(TSS2_Exception):  # already gone: nothing to free
                esys.flush_context(handle)

    def _flush_loaded(self, esys: Any) -> None:
        """Free every cached key's slot before an operation that needs slots of its own."""
        for cache_key in list(self._loaded):
            self._evict(esys, cache_key)

    @staticmethod
    def _is_transport_error(exc: TSS2_Exception) -> bool:
        layer = (int(exc.rc) >> 16) & 0xFF
        return layer in (_TSS2_LAYER_TCTI, _TSS2_LAYER_RESMGR) or exc.error == TPM2_RC.FAILURE

    def _key_type_of(self, record: dict[str, Any]) -> KeyType:
        info = KEY_TYPE_BY_CLI.get(record.get("key_type", ""))
        if info is None:
            raise Internal("tpm.state_corrupt", f"key record has unknown type {record!r:.80}")
        return info.key_type

    def public_key(self, key_id: bytes) -> tuple[bytes, KeyType]:
        record = self._read_record(key_id)
        key_type = self._key_type_of(record)
        if key_type == pb.KEY_TYPE_AES_256:
            return b"", key_type  # a keyed-hash object: nothing public
        public, _ = TPM2B_PUBLIC.unmarshal(_unb64(record["public"]))
        return bytes(public.publicArea.to_der()), key_type

    def key_class(self, key_id: bytes) -> str:
        record = self._read_record(key_id)
        stored = record.get("key_class")
        if stored is None:  # made before classes were stored
            return legacy_key_class(str(record.get("label", "")))
        if stored not in KEY_CLASSES:
            raise Internal("key.class_corrupt", f"TPM key {key_id.hex()}: unknown class")
        return str(stored)

    def public_area(self, key_id: bytes) -> bytes:
        """The key's marshalled TPMT_PUBLIC, as TPM2_Certify names it."""
        record = self._read_record(key_id)
        public, _ = TPM2B_PUBLIC.unmarshal(_unb64(record["public"]))
        return bytes(public.publicArea.marshal())

    def sign(self, key_id: bytes, algorithm: SignatureAlgorithm, data: bytes) -> bytes:
        record = self._read_record(key_id)
        key_type = self._key_type_of(record)
        ainfo = check_sign_request(key_type, algorithm, data)
        assert ainfo.hash_name is not None  # no Ed25519 in a TPM
        hash_alg = _HASH_ALG[ainfo.hash_name]
        if ainfo.family == "ec":
            scheme_alg = TPM2_ALG.ECDSA
        else:
            scheme_alg = TPM2_ALG.RSAPSS if ainfo.pss else TPM2_ALG.RSASSA
        pcrs = tuple(record.get("pcr_indexes", ()))
        needs_auth = bool(record.get("require_auth"))
        auth = self._auth_value() if needs_auth else b""

        cache_key = (key_id, str(record["private"]))

        def sign_once(esys: Any, handle: Any) -> Any:
            session = ESYS_TR.PASSWORD
            try:
                # The handle's auth lives in this ESAPI context only: set it every time,
                # so a changed key auth file takes effect at the next sign, cached or not.
                esys.tr_set_auth(handle, TPM2B_AUTH(auth))
                if pcrs:
                    session = self._policy_session(esys, pcrs, needs_auth)
                scheme = TPMT_SIG_SCHEME(scheme=scheme_alg)
                scheme.details.any.hashAlg = hash_alg
                ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
                return esys.sign(handle, TPM2B_DIGEST(data), scheme, ticket, session1=session)
            finally:
                if session != ESYS_TR.PASSWORD:
                    esys.flush_context(session)

        def do_sign(esys: Any) -> bytes:
            handle, cached = self._loaded_handle(esys, key_id, record)
            try:
                sig = sign_once(esys, handle)
            except TSS2_Exception as exc:
                if self._is_transport_error(exc):
                    raise  # _map_error drops the connection and with it the cache
                self._evict(esys, cache_key)
                # Only a stale cached handle is retried: an auth or policy failure must
                # count once against the TPM's dictionary-attack counter, never twice.
                stale = exc.error in _STALE_HANDLE_RCS or exc.rc == TSS2_RC.ESYS_RC_BAD_TR
                if not cached or not stale:
                    raise
                handle, _ = self._loaded_handle(esys, key_id, record)
                try:
                    sig = sign_once(esys, handle)
                except TSS2_Exception:
                    self._evict(esys, cache_key)
                    raise
            if ainfo.family == "ec":
                r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
                s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
                return encode_dss_signature(r, s)
            if ainfo.pss:
                return bytes(sig.signature.rsapss.sig)
            return bytes(sig.signature.rsassa.sig)

        return self._run("sign", do_sign, key_id)

    # ---- encryption ------------------------------------------------------------------

    def _use_key(self, op: str, key_id: bytes, record: dict[str, Any], use: Callable[..., T]) -> T:
        """Run use(esys, handle, session) with the key loaded and its policy or auth
        satisfied, on the TPM thread; a stale cached handle is retried once (as sign)."""
        pcrs = tuple(record.get("pcr_indexes", ()))
        needs_auth = bool(record.get("require_auth"))
        auth = self._auth_value() if needs_auth else b""
        cache_key = (key_id, str(record["private"]))

        def once(esys: Any, handle: Any) -> T:
            session = ESYS_TR.PASSWORD
            try:
                esys.tr_set_auth(handle, TPM2B_AUTH(auth))
                if pcrs:
                    session = self._policy_session(esys, pcrs, needs_auth)
                return use(esys, handle, session)
            finally:
                if session != ESYS_TR.PASSWORD:
                    esys.flush_context(session)

        def run(esys: Any) -> T:
            handle, cached = self._loaded_handle(esys, key_id, record)
            try:
                return once(esys, handle)
            except TSS2_Exception as exc:
                if self._is_transport_error(exc):
                    raise
                self._evict(esys, cache_key)
                stale = exc.error in _STALE_HANDLE_RCS or exc.rc == TSS2_RC.ESYS_RC_BAD_TR
                if not cached or not stale:
                    raise
                handle, _ = self._loaded_handle(esys, key_id, record)
                try:
                    return once(esys, handle)
                except TSS2_Exception:
                    self._evict(esys, cache_key)
                    raise

        return self._run(op, run, key_id)

    def _encryption_record(self, key_id: bytes) -> tuple[dict[str, Any], KeyType]:
        record = self._read_record(key_id)
        key_type = self._key_type_of(record)
        usage = record.get("usage", pb.KEY_USAGE_UNSPECIFIED)
        if key_usage(key_type, usage) != pb.KEY_USAGE_ENCRYPT_DECRYPT:
            raise InvalidArgument(
                "key.usage_mismatch", "this key signs; it cannot encrypt or decrypt"
            )
        return record, key_type

    def _derive(self, key_id: bytes, record: dict[str, Any], salt: bytes) -> bytes:
        """The one-time AES-256 key for `salt`, computed inside the TPM."""

        def hmac(esys: Any, handle: Any, session: Any) -> bytes:
            digest = esys.hmac(handle, AEAD_CONTEXT + salt, TPM2_ALG.SHA256, session1=session)
            return bytes(digest)

        return self._use_key("encrypt", key_id, record, hmac)

    def encrypt(self, key_id: bytes, plaintext: bytes, aad: bytes) -> Sealed:
        record, key_type = self._encryption_record(key_id)
        if key_type == pb.KEY_TYPE_AES_256:
            salt = os.urandom(AEAD_SALT)
            data_key = self._derive(key_id, record, salt)
            body = AESGCM(data_key).encrypt(_ZERO_NONCE, plaintext, aad)
            return Sealed(pb.ENCRYPTION_ALGORITHM_TPM_HMAC_AES_256_GCM, salt, body)
        public_der, _ = self.public_key(key_id)
        public = serialization.load_der_public_key(public_der)
        assert isinstance(public, rsa.RSAPublicKey)
        limit = public.key_size // 8 - 2 * 32 - 2
        if len(plaintext) > limit:
            raise InvalidArgument(
                "encrypt.plaintext_too_large",
                f"RSA-OAEP with a {public.key_size}-bit key takes at most {limit} bytes; "
                "encrypt a data key (GenerateDataKey) instead",
                {"max_bytes": str(limit)},
            )
        body = public.encrypt(plaintext, _oaep(oaep_label(aad)))
        return Sealed(pb.ENCRYPTION_ALGORITHM_RSA_OAEP_SHA256, b"", body)

    def decrypt(
        self,
        key_id: bytes,
        algorithm: EncryptionAlgorithm,
        nonce: bytes,
        ciphertext: bytes,
        aad: bytes,
    ) -> bytes:
        record, key_type = self._encryption_record(key_id)
        failed = InvalidArgument(
            "decrypt.failed", "the ciphertext does not decrypt with this key and AAD"
        )
        want = (
            pb.ENCRYPTION_ALGORITHM_TPM_HMAC_AES_256_GCM
            if key_type == pb.KEY_TYPE_AES_256
            else pb.ENCRYPTION_ALGORITHM_RSA_OAEP_SHA256
        )
        if algorithm != want:
            raise InvalidArgument(
                "decrypt.algorithm_mismatch",
                f"the ciphertext says algorithm {algorithm}, which this key does not use",
            )
        if key_type == pb.KEY_TYPE_AES_256:
            if len(nonce) != AEAD_SALT or len(ciphertext) < 16:
                raise failed
            data_key = self._derive(key_id, record, nonce)
            try:
                return AESGCM(data_key).decrypt(_ZERO_NONCE, ciphertext, aad)
            except InvalidTag:
                raise failed from None
        size = key_type_info(key_type).bits // 8
        if len(ciphertext) != size:
            raise failed
        public_der, _ = self.public_key(key_id)
        public = serialization.load_der_public_key(public_der)
        assert isinstance(public, rsa.RSAPublicKey)
        # libtpms answers a value above the modulus with TPM_RC_FAILURE (which reads as a
        # broken TPM): refuse it here as what it is.
        if int.from_bytes(ciphertext, "big") >= public.public_numbers().n:
            raise failed
        label = oaep_label(aad)

        def rsa_decrypt(esys: Any, handle: Any, session: Any) -> bytes:
            # Raw RSA in the TPM (scheme NULL on a NULL-scheme key), OAEP decoded here as
            # for PKCS#11: libtpms answers a wrong OAEP label with TPM_RC_FAILURE, which
            # must not look like a broken TPM, and every provider refuses alike.
            scheme = TPMT_RSA_DECRYPT(scheme=TPM2_ALG.NULL)
            try:
                return bytes(esys.rsa_decrypt(handle, ciphertext, scheme, None, session1=session))
            except TSS2_Exception as exc:
                # TPM_RC_VALUE on the ciphertext parameter: not below the modulus.
                if exc.error in (TPM2_RC.VALUE, TPM2_RC.SIZE) and exc.parameter:
                    raise failed from None
                raise

        block = self._use_key("decrypt", key_id, record, rsa_decrypt)
        try:
            return oaep.decode(block.rjust(size, b"\x00"), label, size)
        except oaep.OaepError:
            raise failed from None

    def destroy(self, key_id: bytes) -> None:
        """Remove the key's blob: without it the TPM can no longer load the key.

        The TPM holds nothing of a non-persistent key, so the blob is the key; a copy
        kept elsewhere would still load under this SRK (fixedParent ties it there).
        """
        path = self._path(key_id)
        try:
            path.unlink()
            self._records.pop(key_id, None)
        except FileNotFoundError:
            raise NotFound("key.not_found", f"no TPM key {key_id.hex()}") from None
        self._fsync_dir()

        def evict(esys: Any) -> None:
            for cache_key in [k for k in self._loaded if k[0] == key_id]:
                self._evict(esys, cache_key)

        # Unload it too, so no copy stays usable in the TPM; the blob is already gone, so
        # a TPM that cannot be reached right now changes nothing (its handles die with it).
        with contextlib.suppress(KMSError):
            self._run("destroy", evict, key_id)
        log.info("tpm destroy key_id=%s", key_id.hex())

    def list_keys(self) -> list[StoredKey]:
        keys: list[StoredKey] = []
        for path in sorted(self.state_dir.glob("*" + RECORD_SUFFIX)):
            stem = path.name[: -len(RECORD_SUFFIX)]
            if not _KEY_ID_RE.match(stem):
                continue
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                keys.append(
                    StoredKey(
                        key_id=binascii.unhexlify(stem),
                        label=str(record.get("label", "")),
                        key_type=self._key_type_of(record),
                    )
                )
            except (OSError, ValueError, KMSError) as exc:
                log.warning("tpm skipping unreadable key record path=%s error=%s", path, exc)
        return keys

    def attest(self, key_id: bytes, nonce: bytes) -> Attestation:
        if not 1 <= len(nonce) <= MAX_NONCE_SIZE:
            raise InvalidArgument(
                "attest.nonce_length", f"the nonce must be 1 to {MAX_NONCE_SIZE} bytes"
            )
        record = self._read_record(key_id)
        auth = self._auth_value() if record.get("require_auth") else b""

        def certify(esys: Any) -> Attestation:
            self._flush_loaded(esys)  # the AK and the key need two slots
            ak, ak_pub, _, _, _ = esys.create_primary(None, ak_template(), ESYS_TR.ENDORSEMENT)
            try:
                handle = self._load(esys, record)
                try:
                    if auth:
                        esys.tr_set_auth(handle, TPM2B_AUTH(auth))
                    scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
                    info, sig = esys.certify(handle, ak, nonce, scheme)
                finally:
                    esys.flush_context(handle)
            finally:
                esys.flush_context(ak)
            r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
            s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
            public, _ = TPM2B_PUBLIC.unmarshal(_unb64(record["public"]))
            return Attestation(
                format="tpm2",
                attestation=bytes(info.marshal()[2:]),
                signature=encode_dss_signature(r, s),
                signature_algorithm=pb.SIGNATURE_ALGORITHM_ECDSA_SHA256,
                attestation_key_der=bytes(ak_pub.publicArea.to_der()),
                key_public_area=bytes(public.publicArea.marshal()),
                extra={"ak_public_area": bytes(ak_pub.publicArea.marshal()).hex()},
            )

        return self._run("attest", certify, key_id)

    def attestation_key(self) -> bytes:
        """The AK's SubjectPublicKeyInfo DER: what a verifier pins for this TPM."""

        def make(esys: Any) -> bytes:
            self._flush_loaded(esys)
            ak, ak_pub, _, _, _ = esys.create_primary(None, ak_template(), ESYS_TR.ENDORSEMENT)
            esys.flush_context(ak)
            return bytes(ak_pub.publicArea.to_der())

        return self._run("attestation_key", make)

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True

        def shutdown() -> None:
            if self._esys is not None:
                self._flush_loaded(self._esys)
            if self._esys is not None and self._srk is not None and self.srk_handle is None:
                with contextlib.suppress(TSS2_Exception):
                    self._esys.flush_context(self._srk)
            self._drop_connection()

        try:
            self._executor.submit(shutdown).result()
        finally:
            self._executor.shutdown(wait=True)
        log.info("tpm closed tcti=%s", self.tcti)
