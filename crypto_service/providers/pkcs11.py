"""The PKCS#11 provider: keys on a token (SoftHSM, OP-TEE's TA, a smart card) via python-pkcs11.

Keys are made on the token as sensitive, non-extractable pairs found later by CKA_ID.
The token signs only digests (SoftHSM 2.6 has no CKM_ECDSA_SHA256), so every scheme uses
the raw mechanism: CKM_ECDSA on the digest (r||s turned into DER here), CKM_RSA_PKCS on a
DigestInfo built here, CKM_RSA_PKCS_PSS with explicit parameters, CKM_EDDSA on the message.

Sessions are pooled: PKCS#11 serialises operations per session, so a bounded pool of
sessions lets that many threads sign at once. Login state belongs to the application,
not the session, so one "anchor" session per process and token holds the login and the
pool's sessions ride on it.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import logging
import queue
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from crypto_service.providers import der, oaep
from crypto_service.providers._lean_pkcs11 import defer_pkcs11_util

defer_pkcs11_util()

import pkcs11  # noqa: E402
from pkcs11 import Attribute, Mechanism, ObjectClass  # noqa: E402
from pkcs11 import KeyType as P11KeyType  # noqa: E402
from pkcs11 import exceptions as p11err  # noqa: E402
from pkcs11.mechanisms import GCMParams  # noqa: E402

from crypto_service.config import Pkcs11Config  # noqa: E402
from crypto_service.providers.base import (  # noqa: E402
    Attestation,
    GeneratedKey,
    KeyCreateOptions,
    Sealed,
    StoredKey,
    check_key_class,
    legacy_key_class,
)
from edgekms.algorithms import (  # noqa: E402
    AlgorithmInfo,
    EncryptionAlgorithm,
    KeyType,
    SignatureAlgorithm,
    check_sign_request,
    key_type_info,
    key_usage,
)
from edgekms.envelope import oaep_label  # noqa: E402
from edgekms.errors import (  # noqa: E402
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    KMSError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from edgekms.v1 import common_pb2 as pb  # noqa: E402

log = logging.getLogger(__name__)

MAX_KEY_ID = 64
MAX_LABEL = 128
SESSION_WAIT = 30.0
# A key's class is kept on the token in CKA_SUBJECT of both halves of the pair, as a DER
# Name with one organizationalUnitName "edgekms-key-class:<class>": an attribute any
# PKCS#11 token keeps for keys and nobody but the crypto service can set.
CLASS_OU_PREFIX = "edgekms-key-class:"
# AES-256-GCM as EdgeKMS uses it: a fresh random 96-bit nonce per message (NIST SP
# 800-38D 8.2.2: at most 2^32 messages per key with random nonces; `kmsctl key rotate`
# long before that), 128-bit tag.
GCM_NONCE = 12
GCM_TAG_BITS = 128


def _der(tag: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes((tag, len(body))) + body


def class_subject(key_class: str) -> bytes:
    """The CKA_SUBJECT value recording `key_class`."""
    ou = _der(0x0C, (CLASS_OU_PREFIX + check_key_class(key_class)).encode())
    atv = _der(0x30, _der(0x06, b"\x55\x04\x0b") + ou)
    return _der(0x30, _der(0x31, atv))


_CLASS_BY_SUBJECT: dict[bytes, str] = {}

# DER of the named curves' OIDs, as CKA_EC_PARAMS carries them.
_P256_PARAMS = der.P256_OID
_P384_PARAMS = der.P384_OID
_ED25519_OID_PARAMS = bytes.fromhex("06032b6570")
# PKCS#11 3.0 also allows the curve name as a PrintableString.
_ED25519_NAME_PARAMS = b"\x13\x0cedwards25519"

_EC_PARAMS: dict[KeyType, bytes] = {
    pb.KEY_TYPE_EC_P256: _P256_PARAMS,
    pb.KEY_TYPE_EC_P384: _P384_PARAMS,
}
_CURVES: dict[bytes, KeyType] = {
    _P256_PARAMS: pb.KEY_TYPE_EC_P256,
    _P384_PARAMS: pb.KEY_TYPE_EC_P384,
}
_RSA_BITS: dict[int, KeyType] = {
    2048: pb.KEY_TYPE_RSA_2048,
    3072: pb.KEY_TYPE_RSA_3072,
    4096: pb.KEY_TYPE_RSA_4096,
}

# Hash OIDs (DER, with tag) for the DigestInfo that CKM_RSA_PKCS signs.
_HASH_OIDS = {
    "sha256": bytes.fromhex("0609608648016503040201"),
    "sha384": bytes.fromhex("0609608648016503040202"),
    "sha512": bytes.fromhex("0609608648016503040203"),
}
_PSS_PARAMS = {
    "sha256": (Mechanism.SHA256, pkcs11.MGF.SHA256),
    "sha384": (Mechanism.SHA384, pkcs11.MGF.SHA384),
    "sha512": (Mechanism.SHA512, pkcs11.MGF.SHA512),
}


class _NotPermitted(Exception):
    """The key's own attributes (CKA_ENCRYPT, CKA_DECRYPT) forbid the operation: checked
    here because python-pkcs11 does not map CKR_KEY_FUNCTION_NOT_PERMITTED."""


def _algorithm_mismatch(algorithm: int) -> InvalidArgument:
    return InvalidArgument(
        "decrypt.algorithm_mismatch",
        f"the ciphertext says algorithm {algorithm}, which this key does not use",
    )


def digest_info(hash_name: str, digest: bytes) -> bytes:
    """DigestInfo ::= SEQUENCE { SEQUENCE { hash OID, NULL }, OCTET STRING digest } (RFC 8017)."""
    algorithm = der.tlv(0x30, _HASH_OIDS[hash_name] + b"\x05\x00")
    return der.tlv(0x30, algorithm + der.tlv(0x04, digest))


def _unwrap_octet_string(value: bytes, raw_len: int) -> bytes:
    """CKA_EC_POINT is DER OCTET STRING per spec, yet some tokens return the raw point."""
    if len(value) == raw_len:
        return value
    if len(value) < 2 or value[0] != 0x04:
        raise ValueError("EC point is neither raw nor an OCTET STRING")
    length = value[1]
    offset = 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(value[2 : 2 + count], "big")
        offset = 2 + count
    point = value[offset : offset + length]
    if len(point) != raw_len or offset + length != len(value):
        raise ValueError("EC point has the wrong length")
    return point


def _p11_key_type(obj: Any) -> KeyType:
    """The EdgeKMS key type of a token key object, from attributes that are never sensitive."""
    kt = obj[Attribute.KEY_TYPE]
    if kt == P11KeyType.EC:
        params = bytes(obj[Attribute.EC_PARAMS])
        if params in _CURVES:
            return _CURVES[params]
    elif kt == P11KeyType.RSA:
        bits = len(bytes(obj[Attribute.MODULUS]).lstrip(b"\x00")) * 8
        if bits in _RSA_BITS:
            return _RSA_BITS[bits]
    elif kt == P11KeyType.EC_EDWARDS:
        params = bytes(obj[Attribute.EC_PARAMS])
        if params in (_ED25519_OID_PARAMS, _ED25519_NAME_PARAMS):
            return pb.KEY_TYPE_ED25519
    return pb.KEY_TYPE_UNSPECIFIED


def _public_der(obj: Any) -> tuple[bytes, KeyType]:
    """SubjectPublicKeyInfo DER from a public key object's attributes, and the key's type."""
    key_type = _p11_key_type(obj)
    if key_type in (pb.KEY_TYPE_EC_P256, pb.KEY_TYPE_EC_P384):
        params = _EC_PARAMS[key_type]
        size = der.CURVE_SIZES[params]
        point = _unwrap_octet_string(bytes(obj[Attribute.EC_POINT]), 1 + 2 * size)
        spki = der.ec_public_key_info(params, point)
    elif key_type in _RSA_BITS.values():
        n = int.from_bytes(bytes(obj[Attribute.MODULUS]), "big")
        e = int.from_bytes(bytes(obj[Attribute.PUBLIC_EXPONENT]), "big")
        spki = der.rsa_public_key_info(n, e)
    elif key_type == pb.KEY_TYPE_ED25519:
        point = _unwrap_octet_string(bytes(obj[Attribute.EC_POINT]), 32)
        spki = der.ed25519_public_key_info(point)
    else:
        raise Internal("token.key_type_unknown", "the token holds a key of a type EdgeKMS lacks")
    return spki, key_type


# --- threading: python-pkcs11 initialises modules single-threaded ---------------------


class _CInitializeArgs(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("pReserved", ctypes.c_void_p),
    ]


_CKF_OS_LOCKING_OK = 0x00000002
_THREADED: dict[str, bool] = {}  # module -> the module runs with its own locking
_SERIAL_LOCKS: dict[str, threading.Lock] = {}
_LOAD_LOCK = threading.Lock()


def _load_module(module: str) -> tuple[Any, bool]:
    """The python-pkcs11 lib for `module`, and whether threads may call it at once.

    python-pkcs11 calls C_Initialize(NULL), which tells a module (SoftHSM among them) that
    the application is single-threaded, so it turns its own locking off and concurrent
    sessions corrupt each other. On first load in this process, before any session exists,
    re-initialise the module with CKF_OS_LOCKING_OK. If someone else loaded it first (their
    sessions would not survive a re-init), fall back to one lock around every token call.
    """
    with _LOAD_LOCK:
        if module in _THREADED:
            return pkcs11.lib(module), _THREADED[module]
        fresh = module not in getattr(pkcs11, "_loaded", {})
        lib = pkcs11.lib(module)
        threaded = False
        if fresh:
            try:
                cdll = ctypes.CDLL(module)
                args = _CInitializeArgs(None, None, None, None, _CKF_OS_LOCKING_OK, None)
                rv_fin = cdll.C_Finalize(None)
                rv_init = cdll.C_Initialize(ctypes.byref(args))
                threaded = rv_fin == 0 and rv_init == 0
                if not threaded:
                    log.warning(
                        "event=os_locking_unavailable module=%s finalize_rv=%#x initialize_rv=%#x",
                        module,
                        rv_fin,
                        rv_init,
                    )
                    if rv_init != 0:
                        cdll.C_Initialize(None)
            except (OSError, AttributeError) as exc:
                log.warning("event=os_locking_unavailable module=%s error=%s", module, exc)
        _THREADED[module] = threaded
        _SERIAL_LOCKS.setdefault(module, threading.Lock())
        return lib, threaded


# --- login anchors: one logged-in session per (module, token) in this process -------------


@dataclass
class _Anchor:
    session: Any
    pin_digest: bytes
    users: int = 0


_ANCHORS: dict[tuple[str, str], _Anchor] = {}
_ANCHORS_LOCK = threading.Lock()


def _pin_digest(pin: str) -> bytes:
    return hashlib.sha256(b"edgekms-pin-check\x00" + pin.encode()).digest()


def _acquire_login(module: str, token: Any, pin: str) -> tuple[str, str]:
    key = (module, f"{token.serial!r}/{token.label}")
    with _ANCHORS_LOCK:
        anchor = _ANCHORS.get(key)
        if anchor is None:
            session = token.open(rw=True, user_pin=pin)
            anchor = _ANCHORS[key] = _Anchor(session, _pin_digest(pin))
        elif not hmac.compare_digest(anchor.pin_digest, _pin_digest(pin)):
            # The token already accepted a different PIN in this process: this one is wrong.
            raise p11err.PinIncorrect()
        anchor.users += 1
    return key


def _release_login(key: tuple[str, str]) -> None:
    with _ANCHORS_LOCK:
        anchor = _ANCHORS.get(key)
        if anchor is None:
            return
        anchor.users -= 1
        if anchor.users > 0:
            return
        del _ANCHORS[key]
    try:
        anchor.session.close()  # C_Logout + C_CloseSession
    except p11err.PKCS11Error as exc:
        log.warning("event=logout_failed error=%s", type(exc).__name__)


# --- the pool --------------------------------------------------------------------------


@dataclass
class _PooledSession:
    session: Any
    epoch: int = 0
    private_keys: dict[bytes, Any] = field(default_factory=dict)
    # Secret (AES) keys and RSA public keys used to encrypt, by (object class, key_id).
    objects: dict[tuple[int, bytes], Any] = field(default_factory=dict)


def _token_error(exc: p11err.PKCS11Error, what: str) -> KMSError:
    """A typed error for a token failure that is not the caller's fault."""
    name = type(exc).__name__
    if isinstance(
        exc,
        p11err.DeviceRemoved
        | p11err.TokenNotPresent
        | p11err.DeviceError
        | p11err.SessionClosed
        | p11err.SessionHandleInvalid
        | p11err.UserNotLoggedIn,
    ):
        return Unavailable("token.unavailable", f"{what}: the token is unavailable ({name})")
    if isinstance(exc, p11err.DeviceMemory | p11err.HostMemory | p11err.SessionCount):
        return ResourceExhausted("token.exhausted", f"{what}: the token is out of room ({name})")
    return Internal("token.error", f"{what}: the token failed ({name})")


class Pkcs11Provider:
    """Provider over one PKCS#11 token; thread-safe, `config.sessions` operations at once."""

    kind = "pkcs11"

    def __init__(self, config: Pkcs11Config, pin: str) -> None:
        self.config = config
        self._closed = False
        self._where = f"token {config.token_label!r} in {config.module}"
        self._serial: threading.Lock | None = None
        try:
            lib, threaded = _load_module(config.module)
        except p11err.PKCS11Error as exc:
            raise FailedPrecondition(
                "token.module_unavailable",
                f"cannot load PKCS#11 module {config.module}: {exc}",
            ) from None
        if not threaded:
            self._serial = _SERIAL_LOCKS[config.module]
        try:
            self._token = lib.get_token(token_label=config.token_label)
        except p11err.NoSuchToken:
            raise FailedPrecondition(
                "token.not_found",
                f"token {config.token_label!r}: not found in {config.module}",
                {"token": config.token_label, "module": config.module},
            ) from None
        except p11err.MultipleTokensReturned:
            raise FailedPrecondition(
                "token.ambiguous",
                f"token {config.token_label!r}: several tokens carry this label",
            ) from None
        try:
            self._login_key = _acquire_login(config.module, self._token, pin)
        except p11err.PinIncorrect:
            raise FailedPrecondition(
                "token.pin_incorrect",
                f"token {config.token_label!r}: PIN incorrect",
                {"token": config.token_label, "module": config.module},
            ) from None
        except p11err.PinLocked:
            raise FailedPrecondition(
                "token.pin_locked", f"token {config.token_label!r}: PIN locked"
            ) from None
        except p11err.PKCS11Error as exc:
            raise _token_error(exc, self._where) from None

        mechanisms = self._token.slot.get_mechanisms()
        types: set[KeyType] = set()
        if {Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA} <= mechanisms:
            types |= {pb.KEY_TYPE_EC_P256, pb.KEY_TYPE_EC_P384}
        if {Mechanism.RSA_PKCS_KEY_PAIR_GEN, Mechanism.RSA_PKCS} <= mechanisms:
            types |= {pb.KEY_TYPE_RSA_2048, pb.KEY_TYPE_RSA_3072, pb.KEY_TYPE_RSA_4096}
        if {Mechanism.EC_EDWARDS_KEY_PAIR_GEN, Mechanism.EDDSA} <= mechanisms:
            types.add(pb.KEY_TYPE_ED25519)
        if {Mechanism.AES_KEY_GEN, Mechanism.AES_GCM} <= mechanisms:
            types.add(pb.KEY_TYPE_AES_256)
        # RSA-OAEP is raw RSA in the token plus padding here (providers/oaep.py).
        self._rsa_raw = Mechanism.RSA_X_509 in mechanisms
        self._key_types = frozenset(types)
        self._pss = Mechanism.RSA_PKCS_PSS in mechanisms

        self._pool: queue.Queue[_PooledSession] = queue.Queue()
        self._all: list[_PooledSession] = []
        try:
            for _ in range(config.sessions):
                pooled = _PooledSession(self._token.open(rw=True))
                self._all.append(pooled)
                self._pool.put(pooled)
        except p11err.PKCS11Error as exc:
            self.close()
            raise _token_error(exc, self._where) from None

        self._epoch = 0  # bumped on destroy: pooled handle caches older than it are dropped
        self._state_lock = threading.Lock()
        self._write_lock = threading.Lock()  # check-then-create/destroy are atomic here
        self._public: dict[bytes, tuple[bytes, KeyType]] = {}
        self._classes: dict[bytes, str] = {}
        log.info(
            "event=provider_open kind=pkcs11 token=%s sessions=%d key_types=%s",
            config.token_label,
            config.sessions,
            ",".join(key_type_info(t).cli_name for t in sorted(self._key_types)),
        )

    # -- plumbing ------------------------------------------------------------------------

    @contextmanager
    def _session(self) -> Iterator[_PooledSession]:
        if self._closed:
            raise Unavailable("provider.closed", f"{self._where}: provider is closed")
        try:
            pooled = self._pool.get(timeout=SESSION_WAIT)
        except queue.Empty:
            raise ResourceExhausted(
                "token.busy", f"{self._where}: no session free after {SESSION_WAIT:.0f}s"
            ) from None
        if self._serial is not None:
            self._serial.acquire()
        try:
            with self._state_lock:
                epoch = self._epoch
            if pooled.epoch != epoch:
                pooled.private_keys.clear()
                pooled.objects.clear()
                pooled.epoch = epoch
            yield pooled
        finally:
            if self._serial is not None:
                self._serial.release()
            self._pool.put(pooled)

    @staticmethod
    def _find(session: Any, key_id: bytes, cls: ObjectClass) -> Any | None:
        found = list(session.get_objects({Attribute.ID: key_id, Attribute.CLASS: cls}))
        if len(found) > 1:
            raise Internal("key.duplicate", "the token holds several keys with this key_id")
        return found[0] if found else None

    @staticmethod
    def _check_key_id(key_id: bytes) -> None:
        if not key_id:
            raise InvalidArgument("key.id_missing", "key_id is required")
        if len(key_id) > MAX_KEY_ID:
            raise InvalidArgument("key.id_too_long", f"key_id is limited to {MAX_KEY_ID} bytes")

    def _not_found(self, key_id: bytes) -> NotFound:
        return NotFound("key.not_found", f"no key {key_id.hex()} on {self._where}")

    # -- Provider ------------------------------------------------------------------------

    def key_types(self) -> frozenset[KeyType]:
        return self._key_types

    def generate(
        self, key_id: bytes, label: str, key_type: KeyType, options: KeyCreateOptions
    ) -> GeneratedKey:
        self._check_key_id(key_id)
        info = key_type_info(key_type)
        if key_type not in self._key_types:
            raise FailedPrecondition(
                "provider.key_type_unsupported", f"{self._where} cannot hold {info.cli_name} keys"
            )
        if options.pcr_indexes or options.require_auth:
            raise FailedPrecondition(
                "provider.option_unsupported",
                "PKCS#11 keys take no PCR policy or per-key auth value",
            )
        if len(label) > MAX_LABEL:
            raise InvalidArgument("key.label_too_long", f"labels are limited to {MAX_LABEL}")
        with self._write_lock, self._session() as pooled:
            session = pooled.session
            try:
                if list(session.get_objects({Attribute.ID: key_id})):
                    raise AlreadyExists(
                        "key.id_exists", f"key_id {key_id.hex()} is taken on {self._where}"
                    )
                if key_type == pb.KEY_TYPE_AES_256:
                    self._generate_secret(session, key_id, label, options.key_class)
                    spki = b""
                else:
                    public, private = self._generate_pair(
                        session, key_id, label, key_type, options.key_class, options.usage
                    )
            except p11err.PKCS11Error as exc:
                # C_GenerateKeyPair is all or nothing, but sweep in case a token disagrees.
                self._sweep(session, key_id)
                raise _token_error(exc, f"generate on {self._where}") from None
            if key_type != pb.KEY_TYPE_AES_256:
                try:
                    spki, made_type = _public_der(public)
                    if made_type != key_type:
                        raise Internal("token.key_type_mismatch", "the token made another key type")
                except BaseException:
                    self._sweep(session, key_id)
                    raise
                pooled.private_keys[key_id] = private
        with self._state_lock:
            self._public[key_id] = (spki, key_type)
            self._classes[key_id] = options.key_class
        log.info(
            "event=key_generated key_id=%s type=%s class=%s",
            key_id.hex(),
            info.cli_name,
            options.key_class,
        )
        return GeneratedKey(key_id=key_id, public_key_der=spki)

    @staticmethod
    def _generate_secret(session: Any, key_id: bytes, label: str, key_class: str) -> Any:
        """An AES-256 key that never leaves the token: sensitive, non-extractable, for
        encrypt/decrypt only (no wrap, unwrap, sign or derive). Secret keys carry no
        CKA_SUBJECT, so their class cannot be stored: only user keys may be symmetric."""
        if key_class != "user":
            raise FailedPrecondition(
                "provider.key_type_unsupported", "only user keys may be AES keys"
            )
        template = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.ENCRYPT: True,
            Attribute.DECRYPT: True,
            Attribute.WRAP: False,
            Attribute.UNWRAP: False,
            Attribute.SIGN: False,
            Attribute.VERIFY: False,
            Attribute.DERIVE: False,
        }
        return session.generate_key(
            P11KeyType.AES, 256, id=key_id, label=label, store=True, template=template
        )

    def _generate_pair(
        self,
        session: Any,
        key_id: bytes,
        label: str,
        key_type: KeyType,
        key_class: str,
        usage: pb.KeyUsage.ValueType = pb.KEY_USAGE_UNSPECIFIED,
    ) -> tuple[Any, Any]:
        subject = class_subject(key_class)
        # An encryption RSA key decrypts and never signs; a signing key the other way.
        encrypts = key_usage(key_type, usage) == pb.KEY_USAGE_ENCRYPT_DECRYPT
        public_template = {
            Attribute.SUBJECT: subject,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: False,
            Attribute.VERIFY: not encrypts,
            Attribute.ENCRYPT: encrypts,
            Attribute.WRAP: False,
        }
        private_template = {
            Attribute.SUBJECT: subject,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.SIGN: not encrypts,
            Attribute.DECRYPT: encrypts,
            Attribute.UNWRAP: False,
            Attribute.DERIVE: False,
        }
        flags = (
            pkcs11.MechanismFlag.ENCRYPT | pkcs11.MechanismFlag.DECRYPT
            if encrypts
            else pkcs11.MechanismFlag.SIGN | pkcs11.MechanismFlag.VERIFY
        )
        common: dict[str, Any] = {
            "id": key_id,
            "label": label,
            "store": True,
            "capabilities": flags,
            "public_template": public_template,
            "private_template": private_template,
        }
        family = key_type_info(key_type).family
        if family == "rsa":
            bits = key_type_info(key_type).bits
            return session.generate_keypair(P11KeyType.RSA, bits, **common)  # type: ignore[no-any-return]
        if family == "ec":
            params = session.create_domain_parameters(
                P11KeyType.EC, {Attribute.EC_PARAMS: _EC_PARAMS[key_type]}, local=True
            )
        else:
            params = session.create_domain_parameters(
                P11KeyType.EC_EDWARDS, {Attribute.EC_PARAMS: _ED25519_OID_PARAMS}, local=True
            )
        return params.generate_keypair(**common)  # type: ignore[no-any-return]

    def _sweep(self, session: Any, key_id: bytes) -> None:
        """Remove every object carrying key_id: nothing half-made stays on the token."""
        try:
            for obj in list(session.get_objects({Attribute.ID: key_id})):
                obj.destroy()
        except p11err.PKCS11Error as exc:
            log.error("event=sweep_failed key_id=%s error=%s", key_id.hex(), type(exc).__name__)

    def public_key(self, key_id: bytes) -> tuple[bytes, KeyType]:
        self._check_key_id(key_id)
        with self._state_lock:
            cached = self._public.get(key_id)
        if cached is not None:
            return cached
        with self._session() as pooled:
            try:
                obj = self._find(pooled.session, key_id, ObjectClass.PUBLIC_KEY)
                if obj is not None:
                    result = _public_der(obj)
                elif self._find(pooled.session, key_id, ObjectClass.SECRET_KEY) is not None:
                    result = (b"", pb.KEY_TYPE_AES_256)  # symmetric: no public half
                else:
                    raise self._not_found(key_id)
            except p11err.PKCS11Error as exc:
                raise _token_error(exc, f"public key on {self._where}") from None
        with self._state_lock:
            self._public[key_id] = result
        return result

    def key_class(self, key_id: bytes) -> str:
        self._check_key_id(key_id)
        with self._state_lock:
            cached = self._classes.get(key_id)
        if cached is not None:
            return cached
        with self._session() as pooled:
            try:
                obj = self._find(pooled.session, key_id, ObjectClass.PRIVATE_KEY)
                if obj is not None:
                    found = self._read_class(obj)
                elif self._find(pooled.session, key_id, ObjectClass.SECRET_KEY) is not None:
                    found = "user"  # secret keys are made for user keys only
                else:
                    raise self._not_found(key_id)
            except p11err.PKCS11Error as exc:
                raise _token_error(exc, f"key class on {self._where}") from None
        with self._state_lock:
            self._classes[key_id] = found
        return found

    @staticmethod
    def _read_class(obj: Any) -> str:
        """The class in the key's CKA_SUBJECT; a key without one predates classes."""
        if not _CLASS_BY_SUBJECT:
            for name in ("user", "ca", "internal"):
                _CLASS_BY_SUBJECT[class_subject(name)] = name
        try:
            subject = bytes(obj[Attribute.SUBJECT] or b"")
        except (p11err.AttributeTypeInvalid, p11err.AttributeSensitive):
            subject = b""
        found = _CLASS_BY_SUBJECT.get(subject)
        if found is not None:
            return found
        if subject:
            raise Internal("key.class_corrupt", "the key's stored class is not one EdgeKMS writes")
        return legacy_key_class(str(obj[Attribute.LABEL] or ""))

    def sign(self, key_id: bytes, algorithm: SignatureAlgorithm, data: bytes) -> bytes:
        self._check_key_id(key_id)
        _, key_type = self.public_key(key_id)
        ainfo = check_sign_request(key_type, algorithm, data)
        with self._session() as pooled:
            for attempt in (1, 2):
                key = pooled.private_keys.get(key_id)
                try:
                    if key is None:
                        key = self._find(pooled.session, key_id, ObjectClass.PRIVATE_KEY)
                        if key is None:
                            raise self._not_found(key_id)
                        pooled.private_keys[key_id] = key
                    return self._sign_with(key, ainfo, data)
                except (p11err.ObjectHandleInvalid, p11err.KeyHandleInvalid):
                    # Destroyed behind our back (another replica): look it up afresh once.
                    pooled.private_keys.pop(key_id, None)
                    if attempt == 2:
                        raise self._not_found(key_id) from None
                except (p11err.DataLenRange, p11err.DataInvalid):
                    raise InvalidArgument(
                        "sign.data_rejected", f"the token rejected the data for {ainfo.cli_name}"
                    ) from None
                except p11err.MechanismInvalid:
                    raise FailedPrecondition(
                        "provider.algorithm_unsupported",
                        f"{self._where} cannot sign {ainfo.cli_name}",
                    ) from None
                except p11err.PKCS11Error as exc:
                    raise _token_error(exc, f"sign on {self._where}") from None
        raise self._not_found(key_id)  # pragma: no cover - the loop always returns or raises

    def _sign_with(self, key: Any, ainfo: AlgorithmInfo, data: bytes) -> bytes:
        if ainfo.family == "ec":
            return der.ecdsa_signature(bytes(key.sign(data, mechanism=Mechanism.ECDSA)))
        if ainfo.family == "rsa":
            assert ainfo.hash_name is not None
            if ainfo.pss:
                if not self._pss:
                    raise p11err.MechanismInvalid()
                hash_mech, mgf = _PSS_PARAMS[ainfo.hash_name]
                return bytes(
                    key.sign(
                        data,
                        mechanism=Mechanism.RSA_PKCS_PSS,
                        mechanism_param=(hash_mech, mgf, ainfo.digest_size),
                    )
                )
            return bytes(key.sign(digest_info(ainfo.hash_name, data), mechanism=Mechanism.RSA_PKCS))
        return bytes(key.sign(data, mechanism=Mechanism.EDDSA))

    def destroy(self, key_id: bytes) -> None:
        self._check_key_id(key_id)
        with self._write_lock, self._session() as pooled:
            try:
                objs = [
                    obj
                    for cls in (
                        ObjectClass.PRIVATE_KEY,
                        ObjectClass.PUBLIC_KEY,
                        ObjectClass.SECRET_KEY,
                    )
                    for obj in pooled.session.get_objects(
                        {Attribute.ID: key_id, Attribute.CLASS: cls}
                    )
                ]
                if not objs:
                    raise self._not_found(key_id)
                for obj in objs:
                    obj.destroy()
            except p11err.PKCS11Error as exc:
                raise _token_error(exc, f"destroy on {self._where}") from None
            finally:
                with self._state_lock:
                    self._epoch += 1
                    self._public.pop(key_id, None)
                    self._classes.pop(key_id, None)
                pooled.private_keys.pop(key_id, None)
                pooled.objects.clear()
        log.info("event=key_destroyed key_id=%s", key_id.hex())

    def list_keys(self) -> list[StoredKey]:
        keys: list[StoredKey] = []
        with self._session() as pooled:
            try:
                for obj in pooled.session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}):
                    key_type = _p11_key_type(obj)
                    key_id = bytes(obj[Attribute.ID])
                    if key_type == pb.KEY_TYPE_UNSPECIFIED or not key_id:
                        continue  # not ours: some other tool's key on a shared token
                    keys.append(StoredKey(key_id, str(obj[Attribute.LABEL]), key_type))
                for obj in pooled.session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
                    key_id = bytes(obj[Attribute.ID])
                    if obj[Attribute.KEY_TYPE] != P11KeyType.AES or not key_id:
                        continue
                    keys.append(StoredKey(key_id, str(obj[Attribute.LABEL]), pb.KEY_TYPE_AES_256))
            except p11err.PKCS11Error as exc:
                raise _token_error(exc, f"list on {self._where}") from None
        return keys

    def attest(self, key_id: bytes, nonce: bytes) -> Attestation:
        raise FailedPrecondition("attest.unsupported", "PKCS#11 tokens give no key attestation")

    # -- encryption ----------------------------------------------------------------------

    def _with_object(self, key_id: bytes, cls: ObjectClass, what: str, use: Any) -> Any:
        """Run `use(obj)` on the token object (cached per session handle, looked up afresh
        once if it was destroyed behind our back); token failures become typed errors."""
        with self._session() as pooled:
            for attempt in (1, 2):
                cache_key = (int(cls), key_id)
                obj = pooled.objects.get(cache_key)
                try:
                    if obj is None:
                        obj = self._find(pooled.session, key_id, cls)
                        if obj is None:
                            raise self._not_found(key_id)
                        pooled.objects[cache_key] = obj
                    return use(obj)
                except (p11err.ObjectHandleInvalid, p11err.KeyHandleInvalid):
                    pooled.objects.pop(cache_key, None)
                    if attempt == 2:
                        raise self._not_found(key_id) from None
                except _NotPermitted:
                    raise InvalidArgument(
                        "key.usage_mismatch", "this key signs; it cannot encrypt or decrypt"
                    ) from None
                except p11err.PKCS11Error as exc:
                    raise _token_error(exc, f"{what} on {self._where}") from None
        raise self._not_found(key_id)  # pragma: no cover

    def encrypt(self, key_id: bytes, plaintext: bytes, aad: bytes) -> Sealed:
        self._check_key_id(key_id)
        _, key_type = self.public_key(key_id)
        if key_type == pb.KEY_TYPE_AES_256:
            nonce = secrets.token_bytes(GCM_NONCE)
            params = GCMParams(nonce, aad or None, GCM_TAG_BITS)
            body = self._with_object(
                key_id,
                ObjectClass.SECRET_KEY,
                "encrypt",
                lambda k: bytes(
                    k.encrypt(plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=params)
                ),
            )
            return Sealed(pb.ENCRYPTION_ALGORITHM_AES_256_GCM, nonce, body)
        if key_type_info(key_type).family != "rsa":
            raise InvalidArgument("key.usage_mismatch", "this key cannot encrypt")
        self._require_rsa_raw()
        size = key_type_info(key_type).bits // 8
        if len(plaintext) > oaep.max_message(size):
            raise InvalidArgument(
                "encrypt.plaintext_too_large",
                f"RSA-OAEP with a {size * 8}-bit key takes at most {oaep.max_message(size)} "
                "bytes; encrypt a data key (GenerateDataKey) instead",
                {"max_bytes": str(oaep.max_message(size))},
            )
        block = oaep.encode(plaintext, oaep_label(aad), size)

        def raw_encrypt(pub: Any) -> bytes:
            if not pub[Attribute.ENCRYPT]:
                raise _NotPermitted()
            return bytes(pub.encrypt(block, mechanism=Mechanism.RSA_X_509))

        body = self._with_object(key_id, ObjectClass.PUBLIC_KEY, "encrypt", raw_encrypt)
        return Sealed(pb.ENCRYPTION_ALGORITHM_RSA_OAEP_SHA256, b"", body)

    def _require_rsa_raw(self) -> None:
        if not self._rsa_raw:
            raise FailedPrecondition(
                "provider.algorithm_unsupported", f"{self._where} has no CKM_RSA_X_509"
            )

    def decrypt(
        self,
        key_id: bytes,
        algorithm: EncryptionAlgorithm,
        nonce: bytes,
        ciphertext: bytes,
        aad: bytes,
    ) -> bytes:
        self._check_key_id(key_id)
        _, key_type = self.public_key(key_id)
        failed = InvalidArgument(
            "decrypt.failed", "the ciphertext does not decrypt with this key and AAD"
        )
        if key_type == pb.KEY_TYPE_AES_256:
            if algorithm != pb.ENCRYPTION_ALGORITHM_AES_256_GCM:
                raise _algorithm_mismatch(algorithm)
            if len(nonce) != GCM_NONCE or len(ciphertext) < GCM_TAG_BITS // 8:
                raise failed
            params = GCMParams(nonce, aad or None, GCM_TAG_BITS)

            def gcm_open(k: Any) -> bytes:
                try:
                    return bytes(
                        k.decrypt(ciphertext, mechanism=Mechanism.AES_GCM, mechanism_param=params)
                    )
                except (
                    p11err.GeneralError,
                    p11err.EncryptedDataInvalid,
                    p11err.EncryptedDataLenRange,
                    p11err.FunctionFailed,
                ):
                    # SoftHSM answers a wrong tag with CKR_GENERAL_ERROR.
                    raise failed from None

            return self._with_object(key_id, ObjectClass.SECRET_KEY, "decrypt", gcm_open)  # type: ignore[no-any-return]
        if key_type_info(key_type).family != "rsa":
            raise InvalidArgument("key.usage_mismatch", "this key cannot decrypt")
        if algorithm != pb.ENCRYPTION_ALGORITHM_RSA_OAEP_SHA256:
            raise _algorithm_mismatch(algorithm)
        self._require_rsa_raw()
        size = key_type_info(key_type).bits // 8
        if len(ciphertext) != size:
            raise failed
        label = oaep_label(aad)

        def raw_decrypt(priv: Any) -> bytes:
            if not priv[Attribute.DECRYPT]:
                raise _NotPermitted()
            # SoftHSM answers a value above the modulus with CKR_GENERAL_ERROR: refuse it
            # here as what it is, a ciphertext no one made with this key.
            if int.from_bytes(ciphertext, "big") >= int.from_bytes(
                bytes(priv[Attribute.MODULUS]), "big"
            ):
                raise failed
            try:
                block = bytes(priv.decrypt(ciphertext, mechanism=Mechanism.RSA_X_509))
            except (p11err.EncryptedDataInvalid, p11err.EncryptedDataLenRange, p11err.DataLenRange):
                raise failed from None
            try:
                return oaep.decode(block.rjust(size, b"\x00"), label, size)
            except oaep.OaepError:
                raise failed from None

        return self._with_object(key_id, ObjectClass.PRIVATE_KEY, "decrypt", raw_decrypt)  # type: ignore[no-any-return]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for pooled in getattr(self, "_all", []):
            try:
                pooled.session.close()
            except p11err.PKCS11Error as exc:
                log.warning("event=session_close_failed error=%s", type(exc).__name__)
        self._all = []
        if hasattr(self, "_login_key"):
            _release_login(self._login_key)
        log.info("event=provider_closed kind=pkcs11 token=%s", self.config.token_label)
