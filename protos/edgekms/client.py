"""KMSClient: the synchronous, typed way a Python program reaches EdgeKMS.

It speaks gRPC with mutual TLS to the broker, hashes locally before signing (the wire
carries digests, see docs/design.md) and turns every gRPC failure back into the typed
edgekms.errors exception the broker raised, so callers never see a raw grpc.RpcError.
Every call has a deadline: a broker that hangs must not hang the caller.

Several brokers (a cluster, docs/cluster.md): given a list of addresses, a call that
finds its broker UNAVAILABLE moves to the next one, and stays there. A request is sent
again only when doing it twice cannot do it twice: reads, and state changes carrying a
request_id (the brokers share the idempotency bucket, so the second broker answers the
first one's result). Any other state change moves on only if its broker could not be
reached before it was sent (see `resendable`).

    with KMSClient.from_config(path) as kms:
        kms.create_key("web", "ec-p256")
        sig = kms.sign("web", b"hello")
        cert = builder.sign(kms.remote_key("web"), hashes.SHA256())
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self, TypeVar

import grpc

from edgekms import errors
from edgekms.algorithms import (
    ALGORITHM_BY_CLI,
    KEY_TYPE_BY_CLI,
    AlgorithmInfo,
    KeyType,
    SignatureAlgorithm,
    algorithm_info,
    key_type_info,
)
from edgekms.clientconfig import load_client_config
from edgekms.errors import InvalidArgument, KMSError
from edgekms.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    ca_pb2,
    ca_pb2_grpc,
    clients_pb2,
    clients_pb2_grpc,
    common_pb2,
    enroll_pb2,
    enroll_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
)

if TYPE_CHECKING:
    # The tunnel loads in from_config, for a key in a TPM or token only: a `kmsctl key
    # sign` with a key file pays nothing for its subprocess, shutil and tempfile
    # (docs/performance.md, "kmsctl start-up").
    from edgekms.keytunnel import KeyTunnel
    from edgekms.remote_key import RemoteKey

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
# Generating RSA-4096 on a token, or any key on a slow TPM, takes seconds to a minute.
CREATE_TIMEOUT = 120.0

_Resp = TypeVar("_Resp")
# How long a listing waits for a CA still reading its records (ca.catalog_loading).
CATALOG_PATIENCE = 120.0
# How long get_crl waits for a CRL the CA is still building.
CRL_PATIENCE = 60.0
# Fetches of a chunked CRL that may find it replaced half-way before giving up.
_CRL_ATTEMPTS = 3

# Failures after which the same request may be sent again (edgekms.v1.ErrorCode names).
RETRYABLE = frozenset({"ERROR_CODE_UNAVAILABLE", "ERROR_CODE_DEADLINE_EXCEEDED"})


# Methods that change nothing: sent again, to the same broker or the next, at no risk.
READ_ONLY = frozenset(
    {
        "GetKey",
        "ListKeys",
        "GetPublicKey",
        "Verify",
        "AttestKey",
        "ListClients",
        "GetStatus",
        "WhoAmI",
        "GetCertificate",
        "ListCertificates",
        "ListEnrollTokens",
        "ListDevices",
        "GetDevice",
        "GetCRL",
        "GetRootCRL",
        "GetIssuerCRL",
        "GetCACertificates",
        "ListProfiles",
        "ListAcmeAccounts",
        "ListAcmeEab",
        "GetAcmePolicy",
        # Use a key without changing anything: sent again, they only cost another audit
        # entry.
        "SignBatch",
        "Encrypt",
        "Decrypt",
        "GenerateDataKey",
    }
)
# How long a call waits for a broker's connection before a state change without a
# request_id moves to the next broker (it is never sent twice).
CONNECT_WAIT = 3.0


def resendable(method: str, request: object) -> bool:
    """May this request be sent again after a failure that left its fate unknown? Reads
    may; a state change only with a request_id (the broker, any broker, does it once:
    broker/idempotency.py). A method not known to be a read counts as a state change."""
    if method in READ_ONLY:
        return True
    return bool(getattr(request, "request_id", ""))


def new_request_id() -> str:
    return uuid.uuid4().hex


def resolve_key_type(key_type: KeyType | str) -> KeyType:
    """Accept the enum value or kmsctl's spelling ("ec-p256")."""
    if isinstance(key_type, str):
        info = KEY_TYPE_BY_CLI.get(key_type.lower())
        if info is None:
            raise InvalidArgument(
                "key.type_unknown",
                f"unknown key type {key_type!r}; one of {', '.join(KEY_TYPE_BY_CLI)}",
                {"value": key_type},
            )
        return info.key_type
    return key_type_info(key_type).key_type


def resolve_algorithm(algorithm: SignatureAlgorithm | str) -> AlgorithmInfo:
    """Accept the enum value or kmsctl's spelling ("ecdsa-sha256")."""
    if isinstance(algorithm, str):
        info = ALGORITHM_BY_CLI.get(algorithm.lower())
        if info is None:
            raise InvalidArgument(
                "sign.algorithm_unknown",
                f"unknown signature algorithm {algorithm!r}; one of {', '.join(ALGORITHM_BY_CLI)}",
                {"value": algorithm},
            )
        return info
    return algorithm_info(algorithm)


def prepare_data(ainfo: AlgorithmInfo, data: bytes, prehashed: bool) -> bytes:
    """What goes on the wire: the digest of `data` (or `data` if it already is one);
    Ed25519 signs the message itself, so a digest makes no sense there."""
    if ainfo.hash_name is None:
        if prehashed:
            raise InvalidArgument(
                "sign.prehashed_unsupported", f"{ainfo.cli_name} signs the message, not a digest"
            )
        return data
    if prehashed:
        return data
    # hashlib, not cryptography: the same OpenSSL digests without importing cryptography
    # into every client process (hash_name is a hashlib name: sha256, sha384, sha512).
    return hashlib.new(ainfo.hash_name, data).digest()


def error_from_rpc(exc: grpc.RpcError) -> KMSError:
    """Rebuild the broker's typed error from a failed call (status + trailing Error)."""
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call) else None) or ""
    trailing: bytes | None = None
    if isinstance(exc, grpc.Call):
        for key, value in exc.trailing_metadata() or ():
            if key == errors.ERROR_METADATA_KEY and isinstance(value, bytes):
                trailing = value
                break
    return errors.from_grpc(code, details, trailing)


class _KeySigner:
    """A DigestSigner bound to one key name, for RemoteKey."""

    def __init__(self, client: KMSClient, name: str) -> None:
        self._client = client
        self._name = name

    def sign_digest(self, algorithm: SignatureAlgorithm, data: bytes) -> bytes:
        return self._client.sign_digest(self._name, algorithm, data)


# Items per SignBatch call: the broker's limit (broker/sign_many.py).
SIGN_BATCH_ITEMS = 1000


def _sign_result(result: keys_pb2.SignResult) -> bytes | KMSError:
    if result.WhichOneof("outcome") == "signature":
        return result.signature.signature
    return errors.from_proto(result.error)


class KMSClient:
    """One mTLS channel to the broker. Thread-safe as grpc channels are; close() when done."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        ca_cert: bytes,
        cert: bytes,
        key: bytes,
        server_name: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 0,
        retry_wait: float = 0.25,
        tunnel: KeyTunnel | None = None,
    ) -> None:
        # With a key in a TPM or token, TLS is the tunnel's (edgekms.keytunnel): the
        # channel speaks plain HTTP/2 to its private Unix socket, and the tunnel dials
        # one broker, so such a client does not fail over (docs/cluster.md).
        self._tunnel = tunnel
        if tunnel is not None:
            targets = [target if isinstance(target, str) else target[0]]
        else:
            targets = [target] if isinstance(target, str) else list(dict.fromkeys(target))
        if not targets:
            raise InvalidArgument("config.broker_missing", "no broker address to dial")
        self._credentials = (
            grpc.ssl_channel_credentials(
                root_certificates=ca_cert, private_key=key, certificate_chain=cert
            )
            if tunnel is None
            else None
        )
        self._options: list[tuple[str, str | int]] = []
        if server_name:
            self._options.append(("grpc.default_authority", server_name))
            if tunnel is None:
                self._options.append(("grpc.ssl_target_name_override", server_name))
        # Every broker this client may use, in order of preference; `target` is the one
        # in use (after a failover, the one that answered).
        self.targets = targets
        self._active = 0
        self._channels: dict[int, grpc.Channel] = {}
        self.timeout = timeout
        # Calls failing UNAVAILABLE / DEADLINE_EXCEEDED are sent again, to the next
        # broker first, up to `retries` rounds, as the same request, if `resendable`.
        self.retries = retries
        self.retry_wait = retry_wait
        self._key_types: dict[str, KeyType] = {}
        self._use(0)

    @property
    def target(self) -> str:
        return self.targets[self._active]

    @property
    def _channel(self) -> grpc.Channel:
        return self._channels[self._active]

    def _use(self, index: int) -> None:
        """Point the stubs at broker `index` (its channel made on first use)."""
        channel = self._channels.get(index)
        if channel is None:
            if self._tunnel is not None:
                channel = grpc.insecure_channel(self._tunnel.target, options=self._options)
            else:
                assert self._credentials is not None
                channel = grpc.secure_channel(
                    self.targets[index], self._credentials, options=self._options
                )
            self._channels[index] = channel
        self._active = index
        self._keys = keys_pb2_grpc.KeyServiceStub(channel)
        self._system = keys_pb2_grpc.SystemServiceStub(channel)
        self._ca = ca_pb2_grpc.CertificateAuthorityStub(channel)
        self._clients = clients_pb2_grpc.ClientServiceStub(channel)
        self._audit = audit_pb2_grpc.AuditServiceStub(channel)
        self._devices = enroll_pb2_grpc.DeviceServiceStub(channel)

    def _stub_of(self, method: str, fn: object) -> str:
        """Which stub attribute `fn` (a bound method of the active broker's) is on."""
        for name in ("_keys", "_system", "_ca", "_clients", "_audit", "_devices"):
            if getattr(getattr(self, name), method, None) is fn:
                return name
        raise AssertionError(f"{method} is not a method of this client's stubs")

    def _reachable(self, seconds: float) -> bool:
        """Does the active broker's channel connect within `seconds`?"""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=seconds)
        except grpc.FutureTimeoutError:
            return False
        return True

    def _next_reachable(self, seconds: float) -> bool:
        """Move to the first broker, from the active one on, that connects; False if
        none does."""
        for step in range(len(self.targets)):
            index = (self._active + step) % len(self.targets)
            self._use(index)
            if self._reachable(seconds):
                return True
        return False

    @classmethod
    def from_config(
        cls,
        path: Path | str,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 0,
        retry_wait: float = 0.25,
    ) -> KMSClient:
        """A client for the broker a config file names (`kmsctl init` writes one)."""
        config = load_client_config(Path(path).expanduser())
        tunnel = None
        if config.key_store == "file":
            ca_cert, cert, key = config.read_credentials()
        else:
            # The key stays in the TPM or token: the tunnel does the TLS with it.
            from edgekms.keytunnel import DEFAULT_TCTI, KeyTunnel, TunnelSpec

            (ca_cert, cert), key = config.read_public(), b""
            tunnel = KeyTunnel(
                TunnelSpec(
                    broker=config.broker,
                    server_name=config.server_name or "",
                    ca_cert=str(config.ca_cert),
                    cert=str(config.cert),
                    key=str(config.key),
                    tcti=config.tpm or DEFAULT_TCTI,
                    store=config.key_store,
                    pkcs11_module=config.pkcs11_module or "",
                    pin_file=str(config.pin_file or ""),
                    pin_env=config.pin_env or "",
                )
            )
        try:
            return cls(
                list(config.brokers),
                ca_cert=ca_cert,
                cert=cert,
                key=key,
                server_name=config.server_name,
                timeout=timeout,
                retries=retries,
                retry_wait=retry_wait,
                tunnel=tunnel,
            )
        except BaseException:
            if tunnel is not None:
                tunnel.close()  # the child and its socket directory go with the failure
            raise

    # -- plumbing ---------------------------------------------------------------------

    def _call(
        self, method: str, fn: Callable[..., _Resp], request: object, timeout: float | None
    ) -> _Resp:
        deadline = self.timeout if timeout is None else timeout
        started = time.monotonic()
        again = resendable(method, request)
        stub = self._stub_of(method, fn) if len(self.targets) > 1 else ""
        if stub and not again and not self._reachable(min(deadline, CONNECT_WAIT)):
            # Sent at most once: moved before sending, never after.
            if self._next_reachable(min(deadline, CONNECT_WAIT)):
                log.info("rpc.failover method=%s target=%s", method, self.target)
            fn = getattr(getattr(self, stub), method)
        attempt = 0
        tried = 1
        while True:
            try:
                response = fn(request, timeout=deadline)
                break
            except grpc.RpcError as exc:
                err = error_from_rpc(exc)
                log.debug(
                    "rpc.failed method=%s reason=%s code=%s attempt=%d target=%s elapsed_ms=%d",
                    method,
                    err.reason,
                    err.code_name,
                    attempt,
                    self.target,
                    (time.monotonic() - started) * 1000,
                )
                if err.code_name not in RETRYABLE or not again:
                    raise err from None
                if stub and tried < len(self.targets):
                    # The next broker at once: this one is down, or cut off from the bus.
                    tried += 1
                    self._use((self._active + 1) % len(self.targets))
                    fn = getattr(getattr(self, stub), method)
                    log.info("rpc.failover method=%s target=%s", method, self.target)
                    continue
                if attempt >= self.retries:
                    raise err from None
                attempt += 1
                tried = 1
                if stub:
                    self._use((self._active + 1) % len(self.targets))
                    fn = getattr(getattr(self, stub), method)
                time.sleep(self.retry_wait * min(attempt, 8))
        log.debug("rpc.ok method=%s elapsed_ms=%d", method, (time.monotonic() - started) * 1000)
        return response

    def _remember(self, key: keys_pb2.Key) -> keys_pb2.Key:
        if key.key_type != common_pb2.KEY_TYPE_UNSPECIFIED:
            self._key_types[key.name] = key.key_type
        return key

    def key_type(self, name: str) -> KeyType:
        """The key's type, asked once per client (a key's type never changes)."""
        cached = self._key_types.get(name)
        if cached is None:
            cached = self.get_key(name).key_type
        return cached

    def _algorithm(self, name: str, algorithm: SignatureAlgorithm | str | None) -> AlgorithmInfo:
        if algorithm is None:
            return algorithm_info(key_type_info(self.key_type(name)).default_algorithm)
        return resolve_algorithm(algorithm)

    # -- KeyService -------------------------------------------------------------------

    def create_key(
        self,
        name: str,
        key_type: KeyType | str,
        *,
        provider: str = "",
        policy: common_pb2.KeyPolicy | None = None,
        options: common_pb2.KeyOptions | None = None,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> keys_pb2.Key:
        """Generate a key in a provider. The request_id (random unless given) makes a retry
        after a lost answer return the first result instead of failing with ALREADY_EXISTS."""
        request = keys_pb2.CreateKeyRequest(
            name=name,
            key_type=resolve_key_type(key_type),
            provider=provider,
            policy=policy,
            options=options,
            labels=dict(labels or {}),
            request_id=request_id or new_request_id(),
        )
        deadline = CREATE_TIMEOUT if timeout is None else timeout
        return self._remember(self._call("CreateKey", self._keys.CreateKey, request, deadline))

    def get_key(self, name: str) -> keys_pb2.Key:
        request = keys_pb2.GetKeyRequest(name=name)
        return self._remember(self._call("GetKey", self._keys.GetKey, request, None))

    def list_keys(
        self, prefix: str = "", include_destroyed: bool = False, *, page_size: int = 0
    ) -> list[keys_pb2.Key]:
        """Every key (all pages, of page_size each; 0: the broker's 100) whose name
        starts with `prefix` that this client may see."""
        request = keys_pb2.ListKeysRequest(
            prefix=prefix, include_destroyed=include_destroyed, page_size=page_size
        )
        keys: list[keys_pb2.Key] = []
        while True:
            response = self._call("ListKeys", self._keys.ListKeys, request, None)
            keys.extend(self._remember(k) for k in response.keys)
            if not response.next_page_token:
                return keys
            request.page_token = response.next_page_token

    def get_public_key(self, name: str) -> keys_pb2.PublicKey:
        request = keys_pb2.GetPublicKeyRequest(name=name)
        response = self._call("GetPublicKey", self._keys.GetPublicKey, request, None)
        if response.key_type != common_pb2.KEY_TYPE_UNSPECIFIED:
            self._key_types[name] = response.key_type
        return response

    def sign_digest(self, name: str, algorithm: SignatureAlgorithm, digest: bytes) -> bytes:
        """Sign what is already on-the-wire data: a digest (or the Ed25519 message)."""
        request = keys_pb2.SignRequest(
            name=name, algorithm=algorithm, data=digest, request_id=new_request_id()
        )
        return self._call("Sign", self._keys.Sign, request, None).signature

    def sign(
        self,
        name: str,
        data: bytes,
        *,
        algorithm: SignatureAlgorithm | str | None = None,
        prehashed: bool = False,
    ) -> bytes:
        """Sign `data`, hashing it here with the algorithm's hash unless `prehashed`.
        Without an algorithm, the key type's default (ECDSA over the curve's hash, RSA
        PKCS#1 v1.5 with SHA-256, pure Ed25519). ECDSA signatures come back DER-encoded."""
        ainfo = self._algorithm(name, algorithm)
        return self.sign_digest(name, ainfo.algorithm, prepare_data(ainfo, data, prehashed))

    def sign_digests(
        self,
        items: Iterable[tuple[str, SignatureAlgorithm, bytes]],
        *,
        timeout: float | None = None,
    ) -> list[bytes | KMSError]:
        """Sign many (key name, algorithm, on-the-wire data) items with SignBatch, up to
        SIGN_BATCH_ITEMS per call. One result per item, in order: its signature, or the
        KMSError that item alone was refused with (a refusal of the whole call, such as
        a role that may not sign, is raised)."""
        requests = [
            keys_pb2.SignRequest(name=name, algorithm=algorithm, data=data)
            for name, algorithm, data in items
        ]
        results: list[bytes | KMSError] = []
        for start in range(0, len(requests), SIGN_BATCH_ITEMS):
            chunk = keys_pb2.SignBatchRequest(items=requests[start : start + SIGN_BATCH_ITEMS])
            response = self._call("SignBatch", self._keys.SignBatch, chunk, timeout)
            results.extend(_sign_result(r) for r in response.results)
        return results

    def sign_many(
        self,
        name: str,
        datas: Iterable[bytes],
        *,
        algorithm: SignatureAlgorithm | str | None = None,
        prehashed: bool = False,
        timeout: float | None = None,
    ) -> list[bytes | KMSError]:
        """`sign` for many messages with one key, in batches (see sign_digests)."""
        ainfo = self._algorithm(name, algorithm)
        return self.sign_digests(
            ((name, ainfo.algorithm, prepare_data(ainfo, d, prehashed)) for d in datas),
            timeout=timeout,
        )

    def sign_stream(
        self,
        items: Iterable[tuple[str, SignatureAlgorithm, bytes]],
        *,
        timeout: float | None = None,
    ) -> Iterator[tuple[int, bytes | KMSError]]:
        """Sign over one SignStream, for callers that produce digests as they go: yields
        (position of the item, signature or its KMSError) as answers come, not
        necessarily in order. `items` is read lazily, as the broker asks for more."""
        requests = (
            keys_pb2.SignRequest(
                name=name, algorithm=algorithm, data=data, request_id=new_request_id()
            )
            for name, algorithm, data in items
        )
        responses = self._keys.SignStream(requests, timeout=timeout)
        try:
            for response in responses:
                yield response.index, _sign_result(response.result)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def verify(
        self,
        name: str,
        data: bytes,
        signature: bytes,
        *,
        algorithm: SignatureAlgorithm | str | None = None,
        prehashed: bool = False,
    ) -> bool:
        """True if `signature` is the key's over `data`; a bad signature is False, not an error."""
        ainfo = self._algorithm(name, algorithm)
        request = keys_pb2.VerifyRequest(
            name=name,
            algorithm=ainfo.algorithm,
            data=prepare_data(ainfo, data, prehashed),
            signature=signature,
        )
        return self._call("Verify", self._keys.Verify, request, None).valid

    def disable_key(self, name: str, request_id: str | None = None) -> keys_pb2.Key:
        request = keys_pb2.DisableKeyRequest(name=name, request_id=request_id or new_request_id())
        return self._remember(self._call("DisableKey", self._keys.DisableKey, request, None))

    def enable_key(self, name: str, request_id: str | None = None) -> keys_pb2.Key:
        request = keys_pb2.EnableKeyRequest(name=name, request_id=request_id or new_request_id())
        return self._remember(self._call("EnableKey", self._keys.EnableKey, request, None))

    def destroy_key(self, name: str, request_id: str | None = None) -> keys_pb2.Key:
        request = keys_pb2.DestroyKeyRequest(name=name, request_id=request_id or new_request_id())
        key = self._call("DestroyKey", self._keys.DestroyKey, request, None)
        self._key_types.pop(name, None)
        return key

    def encrypt(self, name: str, plaintext: bytes, aad: bytes = b"") -> keys_pb2.EncryptResponse:
        """Encrypt up to 64 KiB under the key's newest version; `.ciphertext` is a
        self-describing envelope (key name, version, algorithm, nonce) for `decrypt`."""
        request = keys_pb2.EncryptRequest(name=name, plaintext=plaintext, aad=aad)
        return self._call("Encrypt", self._keys.Encrypt, request, None)

    def decrypt(self, ciphertext: bytes, aad: bytes = b"", name: str = "") -> bytes:
        """The plaintext of an envelope from `encrypt` (the same `aad` is required); with
        `name`, the envelope must be that key's."""
        return self.decrypt_full(ciphertext, aad, name).plaintext

    def decrypt_full(
        self, ciphertext: bytes, aad: bytes = b"", name: str = ""
    ) -> keys_pb2.DecryptResponse:
        """As `decrypt`, with the key name and version the envelope named."""
        request = keys_pb2.DecryptRequest(ciphertext=ciphertext, aad=aad, name=name)
        return self._call("Decrypt", self._keys.Decrypt, request, None)

    def generate_data_key(
        self, name: str, aad: bytes = b"", *, without_plaintext: bool = False
    ) -> keys_pb2.GenerateDataKeyResponse:
        """A fresh 256-bit data key: `.plaintext` to use now and forget, `.ciphertext`
        (wrapped under the KMS key) to store beside the data and `decrypt` later."""
        request = keys_pb2.GenerateDataKeyRequest(
            name=name, aad=aad, without_plaintext=without_plaintext
        )
        return self._call("GenerateDataKey", self._keys.GenerateDataKey, request, None)

    def rotate_key(self, name: str, request_id: str | None = None) -> keys_pb2.Key:
        """Make a new version of an encryption key; older ciphertexts keep decrypting."""
        request = keys_pb2.RotateKeyRequest(name=name, request_id=request_id or new_request_id())
        return self._remember(
            self._call("RotateKey", self._keys.RotateKey, request, CREATE_TIMEOUT)
        )

    def attest_key(self, name: str, nonce: bytes) -> keys_pb2.AttestKeyResponse:
        request = keys_pb2.AttestKeyRequest(name=name, nonce=nonce)
        return self._call("AttestKey", self._keys.AttestKey, request, None)

    def remote_key(self, name: str) -> RemoteKey:
        """A cryptography private-key object whose sign() runs in the KMS, so that
        CertificateBuilder().sign(client.remote_key(name), SHA256()) signs in the token."""
        from edgekms.remote_key import remote_key

        public = self.get_public_key(name)
        return remote_key(_KeySigner(self, name), public.der)

    def update_key_policy(
        self, name: str, policy: common_pb2.KeyPolicy, request_id: str | None = None
    ) -> keys_pb2.Key:
        """Replace the key's policy; an empty KeyPolicy clears it (the role table decides)."""
        request = keys_pb2.UpdateKeyPolicyRequest(
            name=name, policy=policy, request_id=request_id or new_request_id()
        )
        return self._call("UpdateKeyPolicy", self._keys.UpdateKeyPolicy, request, None)

    # -- ClientService ----------------------------------------------------------------

    def add_client(
        self,
        name: str,
        role: str,
        *,
        public_key_der: bytes = b"",
        csr: bytes = b"",
        key_pattern: str = "",
        validity_days: int = 0,
    ) -> clients_pb2.AddClientResponse:
        """Have the broker issue a client certificate for a key made here (give its public
        half as DER SubjectPublicKeyInfo, or a CSR); the private key never travels."""
        request = clients_pb2.AddClientRequest(
            name=name,
            role=role,
            key_pattern=key_pattern,
            public_key_der=public_key_der,
            csr=csr,
            validity_days=validity_days,
        )
        return self._call("AddClient", self._clients.AddClient, request, None)

    def renew_client(
        self,
        *,
        csr: bytes = b"",
        public_key_der: bytes = b"",
        validity_days: int = 0,
        request_id: str | None = None,
    ) -> clients_pb2.AddClientResponse:
        """Renew the certificate this client connects with (renewal by the holder): the
        same key, or with `csr`/`public_key_der` a new one. The old certificate is refused
        ("auth.superseded") once the new one is stored; a retry with the same request_id
        (also after that) gets the same certificate. mgmt.renew.renew_client_config does
        this for a config and its files."""
        request = clients_pb2.RenewClientRequest(
            csr=csr,
            public_key_der=public_key_der,
            validity_days=validity_days,
            request_id=request_id or new_request_id(),
        )
        return self._call("RenewClient", self._clients.RenewClient, request, None)

    def list_clients(
        self, include_revoked: bool = False, *, page_size: int = 0
    ) -> list[clients_pb2.Client]:
        """Every client (all pages, of page_size each; 0: the broker's 100), by name."""
        request = clients_pb2.ListClientsRequest(
            include_revoked=include_revoked, page_size=page_size
        )
        clients: list[clients_pb2.Client] = []
        while True:
            response = self._call("ListClients", self._clients.ListClients, request, None)
            clients.extend(response.clients)
            if not response.next_page_token:
                return clients
            request.page_token = response.next_page_token

    def revoke_client(self, name: str = "", serial: str = "") -> clients_pb2.Client:
        """Revoke a certificate, by its client's name or by its serial (hex); the broker
        refuses it from its next request on."""
        request = clients_pb2.RevokeClientRequest(name=name, serial=serial)
        return self._call("RevokeClient", self._clients.RevokeClient, request, None)

    # -- SystemService ----------------------------------------------------------------

    def status(self) -> keys_pb2.GetStatusResponse:
        return self._call("GetStatus", self._system.GetStatus, keys_pb2.GetStatusRequest(), None)

    def whoami(self) -> keys_pb2.WhoAmIResponse:
        return self._call("WhoAmI", self._system.WhoAmI, keys_pb2.WhoAmIRequest(), None)

    # -- AuditService -----------------------------------------------------------------

    def tail_audit(
        self,
        from_seq: int = 1,
        *,
        follow: bool = False,
        timeout: float | None = None,
        writer: str = "",
        device: str = "",
    ) -> Generator[audit_pb2.TailAuditResponse, None, None]:
        """Each audit stream's state, then its stored entries from `from_seq` on: every
        writer's stream in turn (the legacy one first), or only `writer`'s. With `follow`
        (one writer's stream: the broker's unless given), new entries keep coming until
        the iterator is closed (no deadline unless given); without, it ends at the last
        entry present when the call began. The entries are the stored bytes: check them
        with edgekms.audit.ChainVerifier. `device`: on a fleet hub, the hub's copy of that
        device's audit instead (check it with edgekms.fleet.FleetVerifier)."""
        request = audit_pb2.TailAuditRequest(
            from_seq=from_seq, follow=follow, writer=writer, device=device
        )
        deadline = timeout if timeout is not None or follow else 10 * self.timeout
        call = self._audit.TailAudit(request, timeout=deadline)
        try:
            yield from call
        except grpc.RpcError as exc:
            err = error_from_rpc(exc)
            log.debug("rpc.failed method=TailAudit reason=%s code=%s", err.reason, err.code_name)
            raise err from None
        finally:
            call.cancel()  # type: ignore[no-untyped-call]

    # -- CertificateAuthority (the mini-CA, docs/ca.md) ---------------------------------

    def ca_init(
        self,
        common_name: str,
        key_type: KeyType | str = "ec-p256",
        *,
        provider: str = "hsm0",
        organization: str = "",
        root_validity_days: int = 0,
        intermediate_validity_days: int = 0,
        disable_root: bool = False,
        timeout: float | None = None,
        request_id: str | None = None,
        name_constraints: ca_pb2.NameConstraints | None = None,
    ) -> ca_pb2.InitCAResponse:
        """Make the CA: root and intermediate keys in `provider`, their certificates.
        AlreadyExists (ca.already_initialized) when this KMS has a CA."""
        request = ca_pb2.InitCARequest(
            provider=provider,
            key_type=resolve_key_type(key_type),
            common_name=common_name,
            organization=organization,
            root_validity_days=root_validity_days,
            intermediate_validity_days=intermediate_validity_days,
            disable_root=disable_root,
            request_id=request_id or new_request_id(),
            name_constraints=name_constraints,
        )
        deadline = CREATE_TIMEOUT if timeout is None else timeout
        return self._call("Init", self._ca.Init, request, deadline)

    def issue_certificate(
        self,
        profile: str,
        csr: bytes,
        validity_days: int = 0,
        request_id: str | None = None,
        *,
        validity_seconds: int = 0,
    ) -> ca_pb2.IssueCertificateResponse:
        """A certificate for a PKCS#10 request (PEM or DER); the requester recorded is
        this client's certificate name, set by the broker. Sent again with the same
        request_id, the answer is the same certificate (same serial), never a second."""
        request = ca_pb2.IssueCertificateRequest(
            profile=profile,
            csr=csr,
            validity_days=validity_days,
            validity_seconds=validity_seconds,
            request_id=request_id or new_request_id(),
        )
        return self._call("IssueCertificate", self._ca.IssueCertificate, request, None)

    def get_certificate(self, serial: str) -> ca_pb2.CertificateRecord:
        request = ca_pb2.GetCertificateRequest(serial=serial)
        return self._call("GetCertificate", self._ca.GetCertificate, request, None).record

    def list_certificates_page(
        self, request: ca_pb2.ListCertificatesRequest
    ) -> ca_pb2.ListCertificatesResponse:
        """One page as the CA answers it (records without certificate_der). While a CA
        that just started reads its records (ca.catalog_loading, seconds for tens of
        thousands) this asks again, for up to CATALOG_PATIENCE seconds."""
        deadline = time.monotonic() + CATALOG_PATIENCE
        while True:
            try:
                return self._call("ListCertificates", self._ca.ListCertificates, request, None)
            except errors.Unavailable as exc:
                if exc.reason != "ca.catalog_loading" or time.monotonic() > deadline:
                    raise
                log.info("ca.catalog_loading: asking again in 1 s")
                time.sleep(1.0)

    def iter_certificates(
        self,
        *,
        revoked_only: bool = False,
        expiring_within_days: int = 0,
        expiring_within_seconds: int = 0,
        profile: str = "",
        match: str = "",
        state: ca_pb2.CertificateState.ValueType = ca_pb2.CERTIFICATE_STATE_ANY,
        issued_after: str = "",
        page_size: int = 0,
    ) -> Iterator[ca_pb2.CertificateRecord]:
        """Every matching record, soonest to expire first, fetched a page at a time as
        the iteration goes (certificate_der left out: get_certificate has it)."""
        request = ca_pb2.ListCertificatesRequest(
            revoked_only=revoked_only,
            expiring_within_days=expiring_within_days,
            expiring_within_seconds=expiring_within_seconds,
            profile=profile,
            match=match,
            state=state,
            issued_after=issued_after,
            page_size=page_size,
        )
        while True:
            page = self.list_certificates_page(request)
            yield from page.records
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def list_certificates(
        self,
        *,
        revoked_only: bool = False,
        expiring_within_days: int = 0,
        profile: str = "",
        match: str = "",
        state: ca_pb2.CertificateState.ValueType = ca_pb2.CERTIFICATE_STATE_ANY,
        issued_after: str = "",
    ) -> list[ca_pb2.CertificateRecord]:
        """Every matching record (all pages; see iter_certificates)."""
        return list(
            self.iter_certificates(
                revoked_only=revoked_only,
                expiring_within_days=expiring_within_days,
                profile=profile,
                match=match,
                state=state,
                issued_after=issued_after,
            )
        )

    def prune_certificates(
        self, older_than_days: int, *, dry_run: bool = False, request_id: str | None = None
    ) -> ca_pb2.PruneCertificatesResponse:
        """Remove the records of certificates expired more than older_than_days ago."""
        request = ca_pb2.PruneCertificatesRequest(
            older_than_days=older_than_days,
            dry_run=dry_run,
            request_id=request_id or new_request_id(),
        )
        return self._call("PruneCertificates", self._ca.PruneCertificates, request, None)

    def revoke_certificate(
        self,
        serial: str,
        reason: ca_pb2.RevocationReason.ValueType = ca_pb2.REVOCATION_REASON_UNSPECIFIED,
        request_id: str | None = None,
    ) -> ca_pb2.RevokeCertificateResponse:
        request = ca_pb2.RevokeCertificateRequest(
            serial=serial, reason=reason, request_id=request_id or new_request_id()
        )
        return self._call("RevokeCertificate", self._ca.RevokeCertificate, request, None)

    def renew_certificate(
        self,
        serial: str,
        validity_days: int = 0,
        request_id: str | None = None,
        *,
        validity_seconds: int = 0,
    ) -> ca_pb2.IssueCertificateResponse:
        """A new certificate (new serial) for the same key, subject and SANs;
        validity_seconds for lifetimes shorter than a day."""
        request = ca_pb2.RenewCertificateRequest(
            serial=serial,
            validity_days=validity_days,
            validity_seconds=validity_seconds,
            request_id=request_id or new_request_id(),
        )
        return self._call("RenewCertificate", self._ca.RenewCertificate, request, None)

    def renew_held_certificate(
        self,
        certificate_der: bytes,
        csr: bytes,
        *,
        old_key_signature: bytes = b"",
        validity_days: int = 0,
        validity_seconds: int = 0,
        request_id: str | None = None,
    ) -> ca_pb2.IssueCertificateResponse:
        """Renew a mini-CA certificate by proving possession of its key (any role may):
        `csr` signed by the old key, or for a new key signed by it plus the old key's
        `old_key_signature` (edgekms.renewal_proof). The old certificate is revoked with
        reason superseded once the new one is stored. mgmt.renew.renew_held builds the
        request from the files."""
        request = ca_pb2.RenewHeldCertificateRequest(
            certificate_der=certificate_der,
            csr=csr,
            old_key_signature=old_key_signature,
            validity_days=validity_days,
            validity_seconds=validity_seconds,
            request_id=request_id or new_request_id(),
        )
        return self._call("RenewHeldCertificate", self._ca.RenewHeldCertificate, request, None)

    # -- DeviceService (enrollment tokens, the device registry) ------------------------

    def create_enroll_token(
        self,
        name: str,
        profile: str = "device",
        *,
        sans: list[str] | None = None,
        ttl_seconds: int = 0,
        group: str = "",
        attest: bool = False,
        ek_sha256: bytes = b"",
    ) -> enroll_pb2.CreateEnrollTokenResponse:
        """A one-time enrollment token for device `name` (its string is only here);
        `attest`: redeemable only by a TPM-attested enrollment, `ek_sha256`: only by the
        TPM with that EK."""
        request = enroll_pb2.CreateEnrollTokenRequest(
            name=name,
            profile=profile,
            sans=sans or [],
            ttl_seconds=ttl_seconds,
            group=group,
            attest=attest,
            ek_sha256=ek_sha256,
        )
        return self._call("CreateEnrollToken", self._devices.CreateEnrollToken, request, None)

    def iter_enroll_tokens(self, include_spent: bool = False) -> Iterator[enroll_pb2.EnrollToken]:
        request = enroll_pb2.ListEnrollTokensRequest(include_spent=include_spent)
        while True:
            page = self._call("ListEnrollTokens", self._devices.ListEnrollTokens, request, None)
            yield from page.tokens
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def revoke_enroll_token(self, token_id: str) -> enroll_pb2.EnrollToken:
        request = enroll_pb2.RevokeEnrollTokenRequest(id=token_id)
        return self._call("RevokeEnrollToken", self._devices.RevokeEnrollToken, request, None)

    def list_devices_page(
        self, request: enroll_pb2.ListDevicesRequest
    ) -> enroll_pb2.ListDevicesResponse:
        return self._call("ListDevices", self._devices.ListDevices, request, None)

    def iter_devices(
        self, *, group: str = "", denied_only: bool = False, page_size: int = 0
    ) -> Iterator[enroll_pb2.Device]:
        """Every device (by name), a page at a time as the iteration goes."""
        request = enroll_pb2.ListDevicesRequest(
            group=group, denied_only=denied_only, page_size=page_size
        )
        while True:
            page = self.list_devices_page(request)
            yield from page.devices
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def put_unlock_secret(
        self, secret: enroll_pb2.UnlockSecret, replace: bool = False
    ) -> enroll_pb2.UnlockSecret:
        """Store (replace: rotate) a device volume's unlock secret and its policy."""
        request = enroll_pb2.PutUnlockSecretRequest(secret=secret, replace=replace)
        return self._call("PutUnlockSecret", self._devices.PutUnlockSecret, request, None)

    def iter_unlock_secrets(self, device: str = "") -> Iterator[enroll_pb2.UnlockSecret]:
        request = enroll_pb2.ListUnlockSecretsRequest(device=device)
        while True:
            page = self._call("ListUnlockSecrets", self._devices.ListUnlockSecrets, request, None)
            yield from page.secrets
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def get_unlock_secret(self, device: str, volume: str) -> enroll_pb2.UnlockSecret:
        request = enroll_pb2.GetUnlockSecretRequest(device=device, volume=volume)
        return self._call("GetUnlockSecret", self._devices.GetUnlockSecret, request, None)

    def remove_unlock_secret(self, device: str, volume: str) -> enroll_pb2.UnlockSecret:
        request = enroll_pb2.GetUnlockSecretRequest(device=device, volume=volume)
        return self._call("RemoveUnlockSecret", self._devices.RemoveUnlockSecret, request, None)

    def get_device(self, name: str) -> enroll_pb2.Device:
        return self._call(
            "GetDevice", self._devices.GetDevice, enroll_pb2.GetDeviceRequest(name=name), None
        )

    def deny_devices(
        self,
        *,
        name: str = "",
        group: str = "",
        batch: int = 0,
        progress: Callable[[enroll_pb2.DenyDevicesResponse], None] | None = None,
    ) -> enroll_pb2.DenyDevicesResponse:
        """Deny a device or a group (refused at once), revoking every certificate of each
        device batch by batch; `progress` sees each batch's answer. Returns the totals."""
        request = enroll_pb2.DenyDevicesRequest(name=name, group=group, batch=batch)
        total = enroll_pb2.DenyDevicesResponse()
        while True:
            answer = self._call("DenyDevices", self._devices.DenyDevices, request, 120.0)
            total.devices_denied += answer.devices_denied
            total.certificates_revoked += answer.certificates_revoked
            total.devices_total = answer.devices_total
            if progress is not None:
                progress(answer)
            if not answer.next_cursor:
                return total
            request.cursor = answer.next_cursor

    def allow_devices(self, *, name: str = "", group: str = "") -> enroll_pb2.AllowDevicesResponse:
        request = enroll_pb2.AllowDevicesRequest(name=name, group=group)
        return self._call("AllowDevices", self._devices.AllowDevices, request, None)

    def get_crl(self) -> ca_pb2.GetCRLResponse:
        """The whole current CRL. A large CRL comes in chunks (ca.proto GetCRL); they are
        put together here and checked against the CRL's SHA-256, and fetched again from
        the start if the CA replaced the CRL meanwhile. While the CA says a newer CRL is
        being built (revocations just taken), it waits for that one, up to
        CRL_PATIENCE seconds."""
        patience = time.monotonic() + CRL_PATIENCE
        first = self._call("GetCRL", self._ca.GetCRL, ca_pb2.GetCRLRequest(), None)
        while first.pending and time.monotonic() < patience:
            time.sleep(0.5)
            first = self._call("GetCRL", self._ca.GetCRL, ca_pb2.GetCRLRequest(), None)
        for attempt in range(_CRL_ATTEMPTS):
            if attempt:
                first = self._call("GetCRL", self._ca.GetCRL, ca_pb2.GetCRLRequest(), None)
            parts = [first.crl_der]
            size = len(first.crl_der)
            try:
                while size < first.total_size:
                    request = ca_pb2.GetCRLRequest(offset=size, crl_number=first.crl_number)
                    chunk = self._call("GetCRL", self._ca.GetCRL, request, None)
                    if not chunk.crl_der:
                        break
                    parts.append(chunk.crl_der)
                    size += len(chunk.crl_der)
            except errors.FailedPrecondition as exc:
                if exc.reason == "crl.changed":
                    continue
                raise
            der = b"".join(parts)
            if first.sha256 and hashlib.sha256(der).digest() != first.sha256:
                continue
            whole = ca_pb2.GetCRLResponse()
            whole.CopyFrom(first)
            whole.crl_der = der
            return whole
        raise errors.Unavailable("crl.changing", "the CRL kept changing while it was fetched")

    def get_root_crl(self) -> ca_pb2.GetCRLResponse:
        """The root's CRL (revoked intermediates); long-lived, signed by the root."""
        request = ca_pb2.GetRootCRLRequest()
        return self._call("GetRootCRL", self._ca.GetRootCRL, request, None)

    def get_issuer_crl(self, key_id: str) -> ca_pb2.GetCRLResponse:
        """One intermediate's CRL (current or retired) by its key id (SKI hex)."""
        request = ca_pb2.GetIssuerCRLRequest(key_id=key_id)
        return self._call("GetIssuerCRL", self._ca.GetIssuerCRL, request, None)

    def revoke_intermediate(
        self,
        serial: str,
        reason: ca_pb2.RevocationReason.ValueType = ca_pb2.REVOCATION_REASON_UNSPECIFIED,
        request_id: str | None = None,
    ) -> ca_pb2.RevokeIntermediateResponse:
        """The root revokes intermediate `serial` (needs ca/root enabled)."""
        request = ca_pb2.RevokeIntermediateRequest(
            serial=serial, reason=reason, request_id=request_id or new_request_id()
        )
        return self._call("RevokeIntermediate", self._ca.RevokeIntermediate, request, None)

    def rotate_ca(
        self,
        intermediate_validity_days: int = 0,
        name_constraints: ca_pb2.NameConstraints | None = None,
        clear_name_constraints: bool = False,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> ca_pb2.RotateCAResponse:
        """A new intermediate key and certificate; leaves come from it from now on."""
        request = ca_pb2.RotateCARequest(
            intermediate_validity_days=intermediate_validity_days,
            name_constraints=name_constraints,
            clear_name_constraints=clear_name_constraints,
            request_id=request_id or new_request_id(),
        )
        deadline = CREATE_TIMEOUT if timeout is None else timeout
        return self._call("Rotate", self._ca.Rotate, request, deadline)

    def get_ca_certificates(self) -> ca_pb2.GetCACertificatesResponse:
        request = ca_pb2.GetCACertificatesRequest()
        return self._call("GetCACertificates", self._ca.GetCACertificates, request, None)

    def list_profiles(self) -> list[ca_pb2.ProfileInfo]:
        request = ca_pb2.ListProfilesRequest()
        return list(self._call("ListProfiles", self._ca.ListProfiles, request, None).profiles)

    # -- ACME administration (docs/ca.md, "ACME") ------------------------------------------

    def iter_acme_accounts(self, page_size: int = 0) -> Iterator[ca_pb2.AcmeAccount]:
        """Every ACME account, by id, a page at a time."""
        request = ca_pb2.ListAcmeAccountsRequest(page_size=page_size)
        while True:
            page = self._call("ListAcmeAccounts", self._ca.ListAcmeAccounts, request, None)
            yield from page.accounts
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def create_acme_eab(self, note: str = "") -> ca_pb2.CreateAcmeEabResponse:
        """A new external account binding key (administrators only); the MAC key is in
        the answer and nowhere else."""
        request = ca_pb2.CreateAcmeEabRequest(note=note, request_id=new_request_id())
        return self._call("CreateAcmeEab", self._ca.CreateAcmeEab, request, None)

    def iter_acme_eab(self, page_size: int = 0) -> Iterator[ca_pb2.AcmeEab]:
        request = ca_pb2.ListAcmeEabRequest(page_size=page_size)
        while True:
            page = self._call("ListAcmeEab", self._ca.ListAcmeEab, request, None)
            yield from page.keys
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def revoke_acme_eab(self, kid: str) -> ca_pb2.RevokeAcmeEabResponse:
        request = ca_pb2.RevokeAcmeEabRequest(kid=kid)
        return self._call("RevokeAcmeEab", self._ca.RevokeAcmeEab, request, None)

    def acme_policy(self) -> ca_pb2.GetAcmePolicyResponse:
        request = ca_pb2.GetAcmePolicyRequest()
        return self._call("GetAcmePolicy", self._ca.GetAcmePolicy, request, None)

    # -- SPIFFE (docs/spiffe.md) -----------------------------------------------------------

    def spiffe_init(
        self, trust_domain: str, *, ca_validity_days: int = 0, timeout: float | None = None
    ) -> ca_pb2.SpiffeInitResponse:
        """Make the trust domain: its signing CA under the root and its JWT key, both in
        the token (administrators only)."""
        request = ca_pb2.SpiffeInitRequest(
            trust_domain=trust_domain,
            ca_validity_days=ca_validity_days,
            request_id=new_request_id(),
        )
        deadline = CREATE_TIMEOUT if timeout is None else timeout
        return self._call("SpiffeInit", self._ca.SpiffeInit, request, deadline)

    def spiffe_create_entry(
        self,
        spiffe_id: str,
        node: str,
        selectors: list[str],
        *,
        ttl_seconds: int = 0,
        jwt_ttl_seconds: int = 0,
    ) -> ca_pb2.SpiffeEntry:
        request = ca_pb2.SpiffeCreateEntryRequest(
            spiffe_id=spiffe_id,
            node=node,
            selectors=selectors,
            ttl_seconds=ttl_seconds,
            jwt_ttl_seconds=jwt_ttl_seconds,
            request_id=new_request_id(),
        )
        return self._call("SpiffeCreateEntry", self._ca.SpiffeCreateEntry, request, None).entry

    def spiffe_get_entry(self, entry_id: str) -> ca_pb2.SpiffeEntry:
        request = ca_pb2.SpiffeGetEntryRequest(entry_id=entry_id)
        return self._call("SpiffeGetEntry", self._ca.SpiffeGetEntry, request, None).entry

    def spiffe_iter_entries(
        self, node: str = "", page_size: int = 0
    ) -> Iterator[ca_pb2.SpiffeEntry]:
        """Every entry (of `node`), a page at a time; an enrolled device gets its own."""
        request = ca_pb2.SpiffeListEntriesRequest(node=node, page_size=page_size)
        while True:
            page = self._call("SpiffeListEntries", self._ca.SpiffeListEntries, request, None)
            yield from page.entries
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def spiffe_delete_entry(self, entry_id: str) -> ca_pb2.SpiffeEntry:
        request = ca_pb2.SpiffeDeleteEntryRequest(entry_id=entry_id, request_id=new_request_id())
        return self._call("SpiffeDeleteEntry", self._ca.SpiffeDeleteEntry, request, None).entry

    def spiffe_sign_x509_svid(
        self, spiffe_id: str, csr_der: bytes
    ) -> ca_pb2.SpiffeSignX509SvidResponse:
        """An X.509-SVID for a key made here (an enrolled device, for its own entries)."""
        request = ca_pb2.SpiffeSignX509SvidRequest(spiffe_id=spiffe_id, csr=csr_der)
        return self._call("SpiffeSignX509Svid", self._ca.SpiffeSignX509Svid, request, None)

    def spiffe_sign_jwt_svid(
        self, spiffe_id: str, audience: list[str]
    ) -> ca_pb2.SpiffeSignJwtSvidResponse:
        request = ca_pb2.SpiffeSignJwtSvidRequest(spiffe_id=spiffe_id, audience=audience)
        return self._call("SpiffeSignJwtSvid", self._ca.SpiffeSignJwtSvid, request, None)

    def spiffe_federate(
        self,
        trust_domain: str,
        bundle_url: str,
        endpoint_ca_pem: bytes = b"",
        endpoint_spiffe_id: str = "",
        bootstrap_bundle: bytes = b"",
    ) -> ca_pb2.SpiffeFederation:
        """Trust a foreign trust domain's bundle, read from its bundle endpoint:
        `https_web` (endpoint_ca_pem, or the system's roots) or `https_spiffe`
        (endpoint_spiffe_id and the domain's current bundle, given out of band)."""
        request = ca_pb2.SpiffeFederateRequest(
            trust_domain=trust_domain,
            bundle_url=bundle_url,
            endpoint_ca_pem=endpoint_ca_pem,
            endpoint_spiffe_id=endpoint_spiffe_id,
            bootstrap_bundle=bootstrap_bundle,
            request_id=new_request_id(),
        )
        return self._call("SpiffeFederate", self._ca.SpiffeFederate, request, 30.0).federation

    def spiffe_unfederate(self, trust_domain: str) -> ca_pb2.SpiffeFederation:
        """Stop trusting a foreign trust domain; answers the federation removed."""
        request = ca_pb2.SpiffeUnfederateRequest(
            trust_domain=trust_domain, request_id=new_request_id()
        )
        return self._call("SpiffeUnfederate", self._ca.SpiffeUnfederate, request, None).federation

    def spiffe_rotate(
        self,
        x509: bool,
        jwt: bool,
        overlap_seconds: int | None = None,
        ca_validity_days: int = 0,
    ) -> ca_pb2.SpiffeRotateResponse:
        """New SPIFFE signing CA and/or JWT key; the old kept for `overlap_seconds`
        (None: the longest entry TTL plus a minute)."""
        request = ca_pb2.SpiffeRotateRequest(
            x509=x509,
            jwt=jwt,
            overlap_seconds=overlap_seconds or 0,
            overlap_set=overlap_seconds is not None,
            ca_validity_days=ca_validity_days,
            request_id=new_request_id(),
        )
        return self._call("SpiffeRotate", self._ca.SpiffeRotate, request, 120.0)

    def spiffe_bundle(self) -> ca_pb2.SpiffeBundle:
        request = ca_pb2.SpiffeGetBundleRequest()
        return self._call("SpiffeGetBundle", self._ca.SpiffeGetBundle, request, None)

    # -- lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        if self._tunnel is not None:
            self._tunnel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


__all__ = [
    "CREATE_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "READ_ONLY",
    "RETRYABLE",
    "KMSClient",
    "error_from_rpc",
    "new_request_id",
    "prepare_data",
    "resendable",
    "resolve_algorithm",
    "resolve_key_type",
]
