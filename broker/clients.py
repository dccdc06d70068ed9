"""Clients of the broker: who they are, what they may touch, and revoking them at once.

The ClientService issues client certificates from a public key (or CSR) the caller made
itself, signing with the internal CA key inside the token (registry key
`edgekms/internal-ca`) through the crypto service, exactly as the bootstrap ceremony
does. Each client is recorded in the JetStream KV bucket `kms_clients`:

    client.<name>       edgekms.v1.Client (role, key pattern, serial, validity, status)
    revoked.<serial>    the client name; the revocation set, never deleted
    renewal.<serial>    edgekms.v1.ClientRenewal: the certificate that renews this one
    superseded.<serial> the new serial: a renewed certificate, refused from then on

A name has one live certificate, and restrictions belong to that certificate: the key
pattern is looked up by the caller's serial, never by the name it claims. A certificate
the internal CA issued outside `client add` (the bootstrap admin's, or any other) is
recorded under its name at its first request (`created_by` "(first use)"), so it can be
revoked by name like any other, and a later `client add` of that name is ALREADY_EXISTS
instead of a second certificate that would share the name, its policies and its audit
trail. A valid certificate whose name is held by another live certificate is refused
(UNAUTHENTICATED "auth.name_conflict"). `RevokeClient` also takes a bare serial, for a
certificate that never made a request.

Every broker replica follows the bucket with a watcher, so a revocation made anywhere
refuses the certificate on its very next request (UNAUTHENTICATED, "auth.revoked"),
with no restart; the replica that revoked adds the serial to its own set before it even
answers. The AccessGate is what the `rpc` wrapper asks on every request: throttled?
revoked? superseded? expired? which keys may this client touch?

`RenewClient` is renewal by the certificate itself, over the mutual TLS connection it
authenticates (docs/security.md, "Renewal by the holder"): renewal.<old> is created
first (the one place two renewals of one certificate race), then client.<name> moves to
the new serial, then superseded.<old> retires the old certificate. A crash before the
last step leaves the old certificate valid and its retry (same request id) finishes;
after it, only that retry is still let in, and it gets the same certificate back.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fnmatch
import hashlib
import logging
import re
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from nats.js.client import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from broker.authz import KEY_SCOPED_METHODS
from broker.buckets import FollowedBucket
from broker.config import BrokerConfig
from broker.devices import KINDS as DEVICE_KINDS
from broker.devices import DeviceBook
from broker.keys import Context, IdentityCache, rpc
from broker.paging import page_by_name
from broker.registry import KeyRegistry
from broker.throttle import FailureThrottle
from edgekms.client_certs import (
    INTERNAL_CA_KEY,
    check_client_public_key,
    client_certificate,
)
from edgekms.crypto_client import CryptoClient
from edgekms.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    KMSError,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from edgekms.identity import CLIENT_NAME_RE, ROLES, Identity
from edgekms.logs import fields
from edgekms.nats_signer import NatsDigestSigner
from edgekms.remote_key import remote_key
from edgekms.sealed import RecordSeal, TamperedRecord
from edgekms.subjects import CLIENTS_BUCKET
from edgekms.v1 import clients_pb2, clients_pb2_grpc, enroll_pb2

log = logging.getLogger(__name__)

MAX_PATTERN = 256
PATTERN_RE = re.compile(r"^[a-z0-9/._*?\[\]!-]+$")
MAX_VALIDITY_DAYS = 3650
FIRST_USE = "(first use)"
SERIAL_RE = re.compile(r"^[0-9a-f]{1,40}$")
MAX_REQUEST_ID = 128


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def _stamp(when: datetime.datetime | None = None) -> str:
    moment = when or datetime.datetime.now(datetime.UTC)
    return moment.astimezone(datetime.UTC).isoformat(timespec="seconds")


def check_key_pattern(pattern: str) -> None:
    if len(pattern) > MAX_PATTERN or (pattern and not PATTERN_RE.match(pattern)):
        raise InvalidArgument(
            "client.pattern_invalid",
            f"key pattern {pattern[:80]!r} must be a glob of key-name characters and * ? [ ]",
        )


def key_matches(pattern: str, name: str) -> bool:
    """Empty pattern: any key. Otherwise fnmatch, case-sensitive; `*` also crosses `/`."""
    return not pattern or fnmatch.fnmatchcase(name, pattern)


class ClientRegistry(FollowedBucket):
    """The kms_clients bucket, followed into memory. `start()` loads it."""

    bucket = CLIENTS_BUCKET
    description = "EdgeKMS clients (client.<name>) and revoked serials (revoked.<hex>)"

    def __init__(self, js: JetStreamContext, replicas: int = 1, seal: RecordSeal | None = None):
        super().__init__(js, replicas, seal)
        self._clients: dict[str, clients_pb2.Client] = {}
        # serial (hex) -> the record that issued or first saw that certificate.
        self._by_serial: dict[str, clients_pb2.Client] = {}
        self._revoked: set[str] = set()
        # old serial (hex) -> client name, for certificates renewed (renewal.<serial>);
        # and those whose renewal is complete (superseded.<serial>).
        self._renewed: dict[str, str] = {}
        self._superseded: set[str] = set()
        # Enrollment tokens, devices and denied groups (broker.devices).
        self.devices = DeviceBook()

    def _remember(self, record: clients_pb2.Client) -> None:
        self._clients[record.name] = record
        if record.serial:
            self._by_serial[record.serial] = record

    def apply(self, entry: Any) -> None:
        kind, _, rest = entry.key.partition(".")
        if kind == "revoked":
            # Revocations are never undone, whatever happens to the entry.
            self._revoked.add(rest)
            return
        if kind == "superseded":
            self._superseded.add(rest)
            return
        if kind in DEVICE_KINDS:
            self.devices.apply(kind, rest, entry)
            return
        if kind == "renewal":
            if entry.value:
                renewal = clients_pb2.ClientRenewal()
                renewal.ParseFromString(entry.value)
                self._renewed[rest] = renewal.name
            return
        if kind != "client":
            return
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            self._clients.pop(rest, None)
            return
        record = clients_pb2.Client()
        record.ParseFromString(entry.value)
        if record.name != rest:
            log.warning("client record under another name ignored", extra=fields(key=entry.key))
            return
        self._remember(record)
        if record.status == clients_pb2.CLIENT_STATUS_REVOKED and record.serial:
            self._revoked.add(record.serial)

    def refuse(self, entry: Any, err: TamperedRecord) -> None:
        kind, _, rest = entry.key.partition(".")
        if kind in ("revoked", "superseded"):
            # Fail closed: a revocation counts whatever its record says.
            self._revoked.add(rest)
        elif kind in DEVICE_KINDS:
            self.devices.refuse(kind, rest)
        elif kind == "client":
            # The name's certificate is refused until the record is genuine again:
            # its holder is unknown, and binding it reads the record and fails.
            dropped = self._clients.pop(rest, None)
            if dropped is not None and dropped.serial:
                self._by_serial.pop(dropped.serial, None)

    # -- reads (memory) -----------------------------------------------------------------

    def is_revoked(self, serial: int) -> bool:
        return serial_hex(serial) in self._revoked

    def is_superseded(self, serial: int) -> bool:
        return serial_hex(serial) in self._superseded

    def holder(self, serial: str) -> clients_pb2.Client | None:
        """The record of the certificate with this serial (hex), whatever its name now; for
        a renewed certificate, the record of the one that renewed it (same name, role and
        key pattern), until the old one is superseded."""
        record = self._by_serial.get(serial)
        if record is None and serial in self._renewed:
            record = self._clients.get(self._renewed[serial])
        return record

    # -- renewal (RenewClient) --------------------------------------------------------

    async def renewal_of(self, serial: str) -> clients_pb2.ClientRenewal | None:
        try:
            entry = await self.kv.get(f"renewal.{serial}")
        except KeyNotFoundError:
            return None
        renewal = clients_pb2.ClientRenewal()
        renewal.ParseFromString(entry.value or b"")
        return renewal

    async def claim_renewal(self, renewal: clients_pb2.ClientRenewal) -> clients_pb2.ClientRenewal:
        """Create renewal.<old serial>; the renewal already there if a retry (or a rival)
        got there first."""
        try:
            await self.kv.create(f"renewal.{renewal.old_serial}", renewal.SerializeToString())
        except KeyWrongLastSequenceError:
            found = await self.renewal_of(renewal.old_serial)
            if found is None:
                raise Unavailable("client.contended", "the renewal is changing") from None
            return found
        self._renewed[renewal.old_serial] = renewal.name
        return renewal

    async def move_to(self, renewal: clients_pb2.ClientRenewal, cert: x509.Certificate) -> None:
        """Point client.<name> at the new certificate (compare-and-set), unless a retry
        did already; refused if the name no longer belongs to the old certificate."""
        key = f"client.{renewal.name}"
        for _ in range(5):
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                raise NotFound("client.not_found", f"no client named {renewal.name!r}") from None
            record = clients_pb2.Client()
            record.ParseFromString(entry.value or b"")
            if record.serial == renewal.new_serial:
                self._remember(record)
                return
            if (
                record.serial != renewal.old_serial
                or record.status != clients_pb2.CLIENT_STATUS_ACTIVE
            ):
                raise Unauthenticated(
                    "auth.revoked",
                    f"the certificate of client {renewal.name!r} is no longer its own",
                    {"client": renewal.name, "serial": renewal.old_serial},
                )
            record.serial = renewal.new_serial
            record.not_before = _stamp(cert.not_valid_before_utc)
            record.not_after = _stamp(cert.not_valid_after_utc)
            assert entry.revision is not None
            try:
                await self.kv.update(key, record.SerializeToString(), last=entry.revision)
            except KeyWrongLastSequenceError:
                continue
            self._remember(record)
            return
        raise Unavailable("client.contended", f"client {renewal.name!r} is changing; try again")

    async def supersede(self, old_serial: str, new_serial: str) -> None:
        await self.kv.put(f"superseded.{old_serial}", new_serial.encode())
        self._superseded.add(old_serial)

    def get(self, name: str) -> clients_pb2.Client | None:
        record = self._clients.get(name)
        if record is None or record.status == clients_pb2.CLIENT_STATUS_UNSPECIFIED:
            return None
        return record

    def list(self, include_revoked: bool = False) -> list[clients_pb2.Client]:
        out = []
        for name in sorted(self._clients):
            record = self._clients[name]
            if record.status == clients_pb2.CLIENT_STATUS_UNSPECIFIED:
                continue
            if record.status == clients_pb2.CLIENT_STATUS_REVOKED and not include_revoked:
                continue
            out.append(record)
        return out

    # -- writes (bucket, compare-and-set) ---------------------------------------------

    async def reserve(self, name: str, role: str, key_pattern: str, by: str) -> int:
        """Take the name with a pending record; AlreadyExists while an active client has it.

        A revoked name may be given to a new certificate: the old serial stays revoked. A
        pending record left by `by` itself (an enrollment whose broker was killed, retried
        with the same token) is taken over.
        """
        pending = clients_pb2.Client(
            name=name, role=role, key_pattern=key_pattern, created_at=_stamp(), created_by=by
        )
        key = f"client.{name}"
        try:
            return await self.kv.create(key, pending.SerializeToString())
        except KeyWrongLastSequenceError:
            pass
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            raise FailedPrecondition("client.contended", f"client {name!r} is changing") from None
        current = clients_pb2.Client()
        current.ParseFromString(entry.value or b"")
        resumable = (
            current.status == clients_pb2.CLIENT_STATUS_UNSPECIFIED
            and by.startswith("enroll:")
            and current.created_by == by
        )
        if current.status != clients_pb2.CLIENT_STATUS_REVOKED and not resumable:
            raise AlreadyExists("client.exists", f"a client named {name!r} exists")
        assert entry.revision is not None
        try:
            return await self.kv.update(key, pending.SerializeToString(), last=entry.revision)
        except KeyWrongLastSequenceError:
            raise FailedPrecondition("client.contended", f"client {name!r} is changing") from None

    async def activate(self, record: clients_pb2.Client, revision: int) -> None:
        record.status = clients_pb2.CLIENT_STATUS_ACTIVE
        await self.kv.update(f"client.{record.name}", record.SerializeToString(), last=revision)
        self._remember(record)

    async def record_first_use(self, identity: Identity) -> None:
        """Give the name to a certificate `client add` did not issue, if nobody live has it."""
        serial = serial_hex(identity.serial)
        record = clients_pb2.Client(
            name=identity.client,
            role=identity.role,
            serial=serial,
            not_after=_stamp(datetime.datetime.fromisoformat(identity.not_after)),
            created_at=_stamp(),
            created_by=FIRST_USE,
            status=clients_pb2.CLIENT_STATUS_ACTIVE,
        )
        key = f"client.{identity.client}"
        try:
            await self.kv.create(key, record.SerializeToString())
            self._remember(record)
            log.info(
                "client recorded at first use",
                extra=fields(client=identity.client, role=identity.role, serial=serial),
            )
            return
        except KeyWrongLastSequenceError:
            pass
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            raise Unavailable(
                "client.contended", f"client {identity.client!r} is changing"
            ) from None
        current = clients_pb2.Client()
        current.ParseFromString(entry.value or b"")
        if current.serial == serial:  # another broker recorded it first
            self._remember(current)
            return
        if current.status != clients_pb2.CLIENT_STATUS_REVOKED:
            raise Unauthenticated(
                "auth.name_conflict",
                f"client name {identity.client!r} belongs to another certificate",
                {"client": identity.client, "serial": serial, "holder_serial": current.serial},
            )
        assert entry.revision is not None
        try:
            await self.kv.update(key, record.SerializeToString(), last=entry.revision)
        except KeyWrongLastSequenceError:
            raise Unavailable(
                "client.contended", f"client {identity.client!r} is changing"
            ) from None
        self._remember(record)

    async def revoke_serial(self, serial: str, by: str) -> clients_pb2.Client:
        """Revoke a certificate by serial: its client's record if it has one, else the bare
        serial (a certificate that never made a request)."""
        holder = self._by_serial.get(serial)
        if holder is not None:
            current = self._clients.get(holder.name)
            if current is not None and current.serial == serial:
                return await self.revoke(holder.name, by)
        await self.kv.put(f"revoked.{serial}", (holder.name if holder else "").encode())
        self._revoked.add(serial)
        return clients_pb2.Client(
            name=holder.name if holder else "",
            role=holder.role if holder else "",
            serial=serial,
            status=clients_pb2.CLIENT_STATUS_REVOKED,
            revoked_at=_stamp(),
            revoked_by=by,
        )

    async def release(self, name: str, revision: int) -> None:
        """Drop a reservation whose certificate could not be made."""
        with contextlib.suppress(KeyWrongLastSequenceError, KeyNotFoundError):
            await self.kv.delete(f"client.{name}", last=revision)

    async def revoke(self, name: str, by: str) -> clients_pb2.Client:
        key = f"client.{name}"
        for _ in range(5):
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                raise NotFound("client.not_found", f"no client named {name!r}") from None
            record = clients_pb2.Client()
            record.ParseFromString(entry.value or b"")
            if record.status == clients_pb2.CLIENT_STATUS_UNSPECIFIED:
                raise NotFound("client.not_found", f"no client named {name!r}")
            if record.status == clients_pb2.CLIENT_STATUS_REVOKED:
                return record
            # The revocation set first: from here on the certificate is dead everywhere,
            # even if the record update below has to be retried.
            await self.kv.put(f"revoked.{record.serial}", name.encode())
            self._revoked.add(record.serial)
            record.status = clients_pb2.CLIENT_STATUS_REVOKED
            record.revoked_at = _stamp()
            record.revoked_by = by
            assert entry.revision is not None
            try:
                await self.kv.update(key, record.SerializeToString(), last=entry.revision)
            except KeyWrongLastSequenceError:
                continue
            self._remember(record)
            return record
        raise FailedPrecondition("client.contended", f"client {name!r} is changing; try again")


class AccessGate:
    """What the `rpc` wrapper consults on every request, before and after identifying."""

    def __init__(self, clients: ClientRegistry, throttle: FailureThrottle):
        self.clients = clients
        self.throttle = throttle

    @staticmethod
    def certificate_subject(pem: bytes) -> str:
        return "cert:" + hashlib.sha256(pem).hexdigest()[:32]

    def before_identify(self, pem: bytes) -> None:
        self.throttle.check(self.certificate_subject(pem))

    def admit(self, identity: Identity, method: str = "") -> None:
        self.throttle.check("client:" + identity.client)
        if self.clients.is_revoked(identity.serial):
            raise Unauthenticated(
                "auth.revoked",
                f"the certificate of client {identity.client!r} is revoked",
                {"client": identity.client, "serial": serial_hex(identity.serial)},
            )
        if self.clients.devices.is_denied(identity.client):
            raise Unauthenticated(
                "auth.denied",
                f"device {identity.client!r} is denied",
                {"client": identity.client, "serial": serial_hex(identity.serial)},
            )
        # A renewed certificate may still ask for its renewal's answer again (the
        # handler checks it is a retry of that very renewal); nothing else.
        if self.clients.is_superseded(identity.serial) and method != "RenewClient":
            raise Unauthenticated(
                "auth.superseded",
                f"the certificate of client {identity.client!r} was renewed: use the new one",
                {"client": identity.client, "serial": serial_hex(identity.serial)},
            )
        not_after = datetime.datetime.fromisoformat(identity.not_after)
        if not_after <= datetime.datetime.now(datetime.UTC):
            raise Unauthenticated("auth.expired", "the client certificate has expired")

    def failed(self, pem: bytes | None, identity: Identity | None, err: KMSError) -> None:
        if not isinstance(err, Unauthenticated | PermissionDenied):
            return
        if identity is not None:
            self.throttle.failed("client:" + identity.client)
        elif pem is not None:
            self.throttle.failed(self.certificate_subject(pem))

    async def bind(self, identity: Identity) -> None:
        """Make sure the certificate is on record (see the module docstring); a dict
        lookup on every request but its first."""
        if self.clients.holder(serial_hex(identity.serial)) is None:
            await self.clients.record_first_use(identity)

    def key_pattern(self, identity: Identity) -> str:
        """The pattern of this certificate (by serial): a later certificate with the same
        name neither narrows nor widens it."""
        record = self.clients.holder(serial_hex(identity.serial))
        return record.key_pattern if record is not None else ""

    def device(self, identity: Identity) -> enroll_pb2.Device | None:
        """The device record of a certificate enrollment issued (or its renewal), unless
        the device or its group is denied; None for administrators' clients, even one
        later given a device's name."""
        device = self.clients.devices.devices.get(identity.client)
        if device is None or self.clients.devices.is_denied(identity.client):
            return None
        record = self.clients.holder(serial_hex(identity.serial))
        if record is None or not record.created_by.startswith("enroll:"):
            return None
        return device

    def key_allowed(self, identity: Identity, name: str) -> bool:
        return key_matches(self.key_pattern(identity), name)

    def check_scope(self, identity: Identity, method: str, request: Any) -> None:
        if method not in KEY_SCOPED_METHODS:
            return
        name = str(getattr(request, "name", ""))
        pattern = self.key_pattern(identity)
        if not key_matches(pattern, name):
            raise PermissionDenied(
                "authz.key_pattern",
                f"client {identity.client!r} may only use keys matching {pattern!r}",
                {"client": identity.client, "key": name, "pattern": pattern},
            )


def _load_csr_key(csr_bytes: bytes) -> object:
    try:
        if csr_bytes.lstrip().startswith(b"-----BEGIN"):
            csr = x509.load_pem_x509_csr(csr_bytes)
        else:
            csr = x509.load_der_x509_csr(csr_bytes)
    except ValueError:
        raise InvalidArgument("client.csr_invalid", "the CSR is not PEM or DER PKCS#10") from None
    if not csr.is_signature_valid:
        raise InvalidArgument(
            "client.csr_signature", "the CSR's signature does not match its public key"
        )
    return csr.public_key()


def _load_public_key(der: bytes) -> object:
    try:
        return serialization.load_der_public_key(der)
    except (ValueError, TypeError):
        raise InvalidArgument(
            "client.key_invalid", "public_key_der is not a DER SubjectPublicKeyInfo"
        ) from None


class ClientService(clients_pb2_grpc.ClientServiceServicer):
    def __init__(
        self,
        config: BrokerConfig,
        registry: KeyRegistry,
        clients: ClientRegistry,
        crypto: CryptoClient,
        identities: IdentityCache,
        audit: Any = None,
    ):
        self.config = config
        self.registry = registry
        self.clients = clients
        self.crypto = crypto
        self.identities = identities  # read by the `rpc` wrapper
        self.audit = audit  # an edgekms.audit.AuditWriter, read by the `rpc` wrapper

    def _ca_certificate(self, public_key_der: bytes) -> x509.Certificate:
        """The internal CA certificate (from the broker's client-CA file) for this key."""
        for cert in x509.load_pem_x509_certificates(self.config.tls.client_ca.read_bytes()):
            spki = cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            if spki == public_key_der:
                return cert
        raise FailedPrecondition(
            "client.ca_mismatch", "the broker's client CA file does not hold the internal CA"
        )

    async def _issue(
        self,
        name: str,
        role: str,
        public_key: object,
        not_after: datetime.datetime | None,
    ) -> x509.Certificate:
        checked = check_client_public_key(public_key)
        try:
            record = self.registry.get(INTERNAL_CA_KEY)
        except NotFound:
            raise FailedPrecondition(
                "client.no_internal_ca", "the internal CA key is not in the registry"
            ) from None
        ca_cert = self._ca_certificate(record.public_key_der)
        signer = NatsDigestSigner(
            self.crypto,
            asyncio.get_running_loop(),
            record.provider,
            record.key_id,
            timeout=self.config.sign_timeout,
        )
        ca_key = remote_key(signer, record.public_key_der)
        return await asyncio.to_thread(
            client_certificate,
            ca_cert,
            ca_key,  # type: ignore[arg-type]
            checked,
            name,
            role,
            not_after=not_after,
        )

    def _ca_pem(self) -> str:
        ca = self._ca_certificate(self.registry.get(INTERNAL_CA_KEY).public_key_der)
        return ca.public_bytes(serialization.Encoding.PEM).decode()

    @rpc("AddClient")
    async def AddClient(
        self, request: clients_pb2.AddClientRequest, context: Context, identity: Identity
    ) -> clients_pb2.AddClientResponse:
        if not CLIENT_NAME_RE.match(request.name):
            raise InvalidArgument(
                "client.name_invalid",
                f"client name {request.name[:80]!r} must match {CLIENT_NAME_RE.pattern}",
            )
        if request.role not in ROLES:
            raise InvalidArgument(
                "client.role_invalid",
                f"role {request.role[:40]!r} is not one of {', '.join(ROLES)}",
            )
        check_key_pattern(request.key_pattern)
        if request.validity_days > MAX_VALIDITY_DAYS:
            raise InvalidArgument(
                "client.validity_invalid", f"validity is at most {MAX_VALIDITY_DAYS} days"
            )
        if bool(request.csr) == bool(request.public_key_der):
            raise InvalidArgument(
                "client.key_missing", "give exactly one of a CSR or a public key (DER)"
            )
        public_key = (
            _load_csr_key(request.csr) if request.csr else _load_public_key(request.public_key_der)
        )
        check_client_public_key(public_key)
        revision = await self.clients.reserve(
            request.name, request.role, request.key_pattern, identity.client
        )
        not_after = None
        if request.validity_days:
            not_after = datetime.datetime.now(datetime.UTC) + datetime.timedelta(
                days=request.validity_days
            )
        try:
            cert = await self._issue(request.name, request.role, public_key, not_after)
            record = clients_pb2.Client(
                name=request.name,
                role=request.role,
                key_pattern=request.key_pattern,
                serial=serial_hex(cert.serial_number),
                not_before=_stamp(cert.not_valid_before_utc),
                not_after=_stamp(cert.not_valid_after_utc),
                created_at=_stamp(),
                created_by=identity.client,
            )
            await self.clients.activate(record, revision)
        except BaseException:
            await self.clients.release(request.name, revision)
            raise
        log.info(
            "client added",
            extra=fields(
                client=record.name,
                role=record.role,
                pattern=record.key_pattern,
                serial=record.serial,
                by=identity.client,
            ),
        )
        return clients_pb2.AddClientResponse(
            client=record,
            certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            ca_certificate_pem=self._ca_pem(),
        )

    @rpc("ListClients")
    async def ListClients(
        self, request: clients_pb2.ListClientsRequest, context: Context, identity: Identity
    ) -> clients_pb2.ListClientsResponse:
        page, next_token = page_by_name(
            self.clients.list(include_revoked=request.include_revoked),
            lambda c: c.name,
            request.page_size,
            request.page_token,
        )
        return clients_pb2.ListClientsResponse(clients=page, next_page_token=next_token)

    @rpc("RevokeClient")
    async def RevokeClient(
        self, request: clients_pb2.RevokeClientRequest, context: Context, identity: Identity
    ) -> clients_pb2.Client:
        if bool(request.name) == bool(request.serial):
            raise InvalidArgument(
                "client.revoke_target", "give exactly one of a client name or a serial"
            )
        if request.serial:
            serial = request.serial.lower().removeprefix("0x").lstrip("0") or "0"
            if not SERIAL_RE.match(serial):
                raise InvalidArgument(
                    "client.serial_invalid", "a serial is 1 to 40 hexadecimal digits"
                )
            record = await self.clients.revoke_serial(serial, identity.client)
        else:
            if not CLIENT_NAME_RE.match(request.name):
                raise InvalidArgument("client.name_invalid", "not a client name")
            record = await self.clients.revoke(request.name, identity.client)
        log.warning(
            "client revoked",
            extra=fields(client=record.name, serial=record.serial, by=identity.client),
        )
        return record

    @rpc("RenewClient")
    async def RenewClient(
        self, request: clients_pb2.RenewClientRequest, context: Context, identity: Identity
    ) -> clients_pb2.AddClientResponse:
        """Renewal by the certificate itself (see the module docstring for the order of
        writes that keeps one of the two certificates valid whatever fails)."""
        if not request.request_id or len(request.request_id) > MAX_REQUEST_ID:
            raise InvalidArgument(
                "renew.request_id_invalid",
                f"a renewal needs a request_id of 1 to {MAX_REQUEST_ID} characters",
            )
        if request.csr and request.public_key_der:
            raise InvalidArgument(
                "renew.key_conflict", "give at most one of a CSR or a public key (rekey)"
            )
        if request.validity_days > MAX_VALIDITY_DAYS:
            raise InvalidArgument(
                "client.validity_invalid", f"validity is at most {MAX_VALIDITY_DAYS} days"
            )
        caller = self.identities.caller_certificate(context)
        if request.csr:
            public_key = _load_csr_key(request.csr)
        elif request.public_key_der:
            public_key = _load_public_key(request.public_key_der)
        else:
            public_key = caller.public_key()
        check_client_public_key(public_key)
        wanted_spki = _spki(public_key)
        device = self.identities.device(identity)
        if device is not None and device.ek_sha256 and wanted_spki != _spki(caller.public_key()):
            # Its key is the one its TPM's AK certified at enrollment; a new key would be
            # one nobody proved is in that TPM. Moving to a new key is a new --attest.
            raise FailedPrecondition(
                "renew.rekey_attested",
                f"device {identity.client!r} enrolled with TPM attestation: renew its "
                "certified key, or enroll again with --attest for a new one",
                {"client": identity.client},
            )
        old_serial = serial_hex(identity.serial)
        renewal = await self.clients.renewal_of(old_serial)
        if renewal is None:
            if self.clients.is_superseded(identity.serial):
                raise _superseded(identity)
            lifetime = caller.not_valid_after_utc - caller.not_valid_before_utc
            if request.validity_days:
                lifetime = datetime.timedelta(days=request.validity_days)
            not_after = datetime.datetime.now(datetime.UTC) + lifetime
            fresh = await self._issue(identity.client, identity.role, public_key, not_after)
            renewal = await self.clients.claim_renewal(
                clients_pb2.ClientRenewal(
                    name=identity.client,
                    old_serial=old_serial,
                    new_serial=serial_hex(fresh.serial_number),
                    request_id=request.request_id,
                    certificate_der=fresh.public_bytes(serialization.Encoding.DER),
                    renewed_at=_stamp(),
                )
            )
        if renewal.request_id != request.request_id:
            # Renewed already, by another request: only that request's retry may ask.
            raise _superseded(identity)
        cert = x509.load_der_x509_certificate(renewal.certificate_der)
        if _spki(cert.public_key()) != wanted_spki:
            raise InvalidArgument(
                "request.id_reused", "this request id renewed the certificate for another key"
            )
        await self.clients.move_to(renewal, cert)
        await self.clients.supersede(old_serial, renewal.new_serial)
        record = self.clients.get(identity.client)
        log.info(
            "client renewed",
            extra=fields(
                client=identity.client,
                old_serial=old_serial,
                serial=renewal.new_serial,
                rekey=wanted_spki != _spki(caller.public_key()),
            ),
        )
        return clients_pb2.AddClientResponse(
            client=record,
            certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            ca_certificate_pem=self._ca_pem(),
        )


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _superseded(identity: Identity) -> Unauthenticated:
    return Unauthenticated(
        "auth.superseded",
        f"the certificate of client {identity.client!r} was renewed already: use the new one",
        {"client": identity.client, "serial": serial_hex(identity.serial)},
    )
