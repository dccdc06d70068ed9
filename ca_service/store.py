"""The CA's state in a JetStream KV bucket: its own keys and certificates, every issued
certificate by serial, the CRL number and the current CRL.

Layout of bucket `kms_ca` (values are serialized edgekms.v1 protobuf messages):

    config          CAState: provider, key ids, root and intermediate certificates
    cert.<SERIAL>   CertificateRecord (upper-case hex serial), status and revocation
    crl.number      the last CRL number handed out, decimal ASCII (monotonic counter)
    crl.meta        StoredCRL: the current CRL's number, size, SHA-256 and chunk slot
    crl.der.<s>.<i> its DER in 64 KiB chunks (ca_service.crlstore)

Every write that must not race uses KV's revision check (create-if-absent, or update at
the revision read), so several CA replicas can share one bucket.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from edgekms import kvread
from edgekms.errors import AlreadyExists, FailedPrecondition, Internal, NotFound
from edgekms.sealed import RecordSeal, SealedKV, sealed
from edgekms.subjects import CA_BUCKET
from edgekms.v1 import ca_pb2

log = logging.getLogger(__name__)

CONFIG_KEY = "config"
CRL_NUMBER_KEY = "crl.number"
_CAS_RETRIES = 20


def cert_key(serial: str) -> str:
    return f"cert.{serial.upper()}"


def normalize_serial(serial: str) -> str:
    """Accept "0A:1B", "0a1b" or "0x0A1B"; answer the canonical upper-case hex."""
    text = serial.strip().lower().removeprefix("0x").replace(":", "")
    try:
        value = int(text, 16)
    except ValueError:
        raise NotFound("cert.not_found", f"{serial!r} is not a serial number") from None
    if value <= 0:
        raise NotFound("cert.not_found", f"{serial!r} is not a serial number")
    return f"{value:X}"


def rfc3339(ts: datetime.datetime) -> str:
    return ts.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> datetime.datetime:
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)


class CAStore:
    """Async access to the CA bucket; raises edgekms.errors types."""

    def __init__(self, js: Any, kv: Any, bucket: str):
        self.kv = kv
        self._js = js
        self.bucket = bucket

    @property
    def js(self) -> Any:
        """The JetStream context, for readers of the whole bucket (ca_service.catalog)."""
        return self._js

    def open_entry(self, entry: Any) -> Any:
        """A raw bucket entry as this store reads it: its seal verified and taken off
        (TamperedRecord if it fails) when the store seals; as it is otherwise."""
        return self.kv.open_entry(entry) if isinstance(self.kv, SealedKV) else entry

    @classmethod
    async def open(
        cls, js: Any, bucket: str = CA_BUCKET, seal: RecordSeal | None = None, replicas: int = 1
    ) -> CAStore:
        """The bucket, made if absent; with `seal` every value is signed as the CA on
        write and verified on read (edgekms.sealed), a tampered one refused."""
        from edgekms import kvstore

        # No rollups, no purge or delete: edgekms.kvstore.
        kv = await kvstore.open_kv(js, kvstore.spec_for(bucket, "EdgeKMS mini-CA state"), replicas)
        return cls(js, sealed(kv, bucket, seal), bucket)

    # ---- the CA itself -------------------------------------------------------------------

    async def get_state(self) -> tuple[ca_pb2.CAState, int] | None:
        try:
            entry = await self.kv.get(CONFIG_KEY)
        except KeyNotFoundError:
            return None
        state = ca_pb2.CAState()
        state.ParseFromString(entry.value)
        return state, int(entry.revision)

    async def require_state(self) -> ca_pb2.CAState:
        found = await self.get_state()
        if found is None:
            raise FailedPrecondition("ca.not_initialized", "no CA yet: run `kmsctl ca init`")
        return found[0]

    async def update_state(self, state: ca_pb2.CAState, revision: int) -> int:
        """Replace the CA state read at `revision` (rotation, intermediate revocation);
        FailedPrecondition ca.state_changed if another writer got there first."""
        try:
            return int(await self.kv.update(CONFIG_KEY, state.SerializeToString(), last=revision))
        except KeyWrongLastSequenceError:
            raise FailedPrecondition(
                "ca.state_changed", "the CA changed meanwhile (another rotation?): try again"
            ) from None

    async def create_state(self, state: ca_pb2.CAState) -> None:
        try:
            await self.kv.create(CONFIG_KEY, state.SerializeToString())
        except KeyWrongLastSequenceError:
            raise AlreadyExists("ca.already_initialized", "this CA exists already") from None

    # ---- certificates --------------------------------------------------------------------

    async def create_record(self, record: ca_pb2.CertificateRecord) -> None:
        """Store a new certificate's record; AlreadyExists("cert.serial_taken") if the
        serial is in use, which the caller answers by signing again with a new serial."""
        try:
            await self.kv.create(cert_key(record.serial), record.SerializeToString())
        except KeyWrongLastSequenceError:
            raise AlreadyExists("cert.serial_taken", f"serial {record.serial} exists") from None
        log.info(
            "event=ca_record_stored serial=%s profile=%s requester=%s",
            record.serial,
            record.profile,
            record.requester,
        )

    async def get_record(self, serial: str) -> tuple[ca_pb2.CertificateRecord, int]:
        canonical = normalize_serial(serial)
        try:
            entry = await self.kv.get(cert_key(canonical))
        except KeyNotFoundError:
            raise NotFound(
                "cert.not_found", f"no certificate with serial {canonical}", {"serial": canonical}
            ) from None
        record = ca_pb2.CertificateRecord()
        record.ParseFromString(entry.value)
        return record, int(entry.revision)

    async def find_record(self, serial: int) -> ca_pb2.CertificateRecord | None:
        try:
            return (await self.get_record(f"{serial:X}"))[0]
        except NotFound:
            return None

    async def list_records(self) -> list[ca_pb2.CertificateRecord]:
        # Not KeyValue.watch(): it can end its replay early (see edgekms.kvread), and
        # a short list here is a CRL without some revocations.
        entries, _ = await kvread.snapshot(self._js, self.bucket, "cert.>")
        records: list[ca_pb2.CertificateRecord] = []
        for entry in entries:
            if entry.value and not kvread.is_removal(entry):
                if isinstance(self.kv, SealedKV):
                    # Fail closed: a CRL built past a tampered record could miss it.
                    entry = self.kv.open_entry(entry)
                record = ca_pb2.CertificateRecord()
                record.ParseFromString(entry.value or b"")
                records.append(record)
        return records

    async def revoke(
        self,
        serial: str,
        reason: int,
        revoked_at: datetime.datetime,
        requester: str = "",
        request_id: str = "",
        crl_number: int = 0,
    ) -> tuple[ca_pb2.CertificateRecord, bool]:
        """Mark a certificate revoked; the revision check makes a concurrent second
        revocation see the first and fail with cert.already_revoked. A retry of the
        revocation that did it (same requester and request id) gets the record back;
        the bool says whether this call revoked it. `crl_number`, reserved before, is
        kept with the revocation: the CRL with that number or a later one lists it, and a
        retry answers with it."""
        for _ in range(_CAS_RETRIES):
            record, revision = await self.get_record(serial)
            if record.status == ca_pb2.CERTIFICATE_STATUS_REVOKED:
                if request_id and (record.revocation_request_id, record.revoked_by) == (
                    request_id,
                    requester,
                ):
                    return record, False
                raise FailedPrecondition(
                    "cert.already_revoked",
                    f"certificate {record.serial} was revoked at {record.revoked_at}",
                    {"serial": record.serial},
                )
            record.status = ca_pb2.CERTIFICATE_STATUS_REVOKED
            record.revoked_at = rfc3339(revoked_at)
            record.revocation_reason = reason  # type: ignore[assignment]
            record.revocation_request_id = request_id
            record.revoked_by = requester
            record.revocation_crl_number = crl_number
            try:
                await self.kv.update(
                    cert_key(record.serial), record.SerializeToString(), last=revision
                )
            except KeyWrongLastSequenceError:
                continue
            log.info("event=ca_revoked serial=%s reason=%s", record.serial, reason)
            return record, True
        raise Internal("store.contention", "the certificate record kept changing; try again")

    async def mark_superseded(self, serial: str, by: str) -> ca_pb2.CertificateRecord | None:
        """Note on a renewed certificate's record which certificate replaced it (for
        listing and retention); None if the record is gone. The newest renewal wins."""
        for _ in range(_CAS_RETRIES):
            try:
                record, revision = await self.get_record(serial)
            except NotFound:
                return None
            record.superseded_by = by
            try:
                await self.kv.update(
                    cert_key(record.serial), record.SerializeToString(), last=revision
                )
            except KeyWrongLastSequenceError:
                continue
            return record
        raise Internal("store.contention", "the certificate record kept changing; try again")

    async def remove_expired(self, serial: str, horizon: str) -> ca_pb2.CertificateRecord | None:
        """Delete a record whose certificate expired before `horizon` (RFC 3339), at the
        revision checked; None (nothing removed) if it is gone, changed meanwhile, or not
        that old. A delete marker, not a purge: the CA's bucket refuses purges and rollups
        from every identity (edgekms.kvstore), so the old revisions stay until the bucket's
        per-key history (edgekms.kvstore) pushes them out."""
        try:
            record, revision = await self.get_record(serial)
        except NotFound:
            return None
        if not record.not_after or record.not_after >= horizon:
            return None
        try:
            await self.kv.delete(cert_key(record.serial), last=revision)
        except KeyWrongLastSequenceError:
            return None
        log.info("event=ca_record_pruned serial=%s not_after=%s", record.serial, record.not_after)
        return record

    # ---- CRL -----------------------------------------------------------------------------

    async def next_crl_number(self) -> int:
        """Take the next CRL number; never hands out the same number twice."""
        for _ in range(_CAS_RETRIES):
            try:
                entry = await self.kv.get(CRL_NUMBER_KEY)
            except KeyNotFoundError:
                try:
                    await self.kv.create(CRL_NUMBER_KEY, b"1")
                except KeyWrongLastSequenceError:
                    continue
                return 1
            number = int(entry.value.decode()) + 1
            try:
                await self.kv.update(CRL_NUMBER_KEY, str(number).encode(), last=entry.revision)
            except KeyWrongLastSequenceError:
                continue
            return number
        raise Internal("store.contention", "the CRL number kept changing; try again")

    async def get_crl(self, key: str) -> ca_pb2.GetCRLResponse | None:
        """A CRL kept whole in one record: the root's or a retired intermediate's
        (ca_service.hierarchy); the current intermediate's is in chunks (ca_service.crlstore)."""
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        crl = ca_pb2.GetCRLResponse()
        crl.ParseFromString(entry.value)
        return crl

    async def store_crl(self, crl: ca_pb2.GetCRLResponse, key: str) -> bool:
        """Keep `crl` under `key` unless a CRL with a higher number is there already (two
        replicas building at once): the higher number was built later, from more."""
        for _ in range(_CAS_RETRIES):
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                try:
                    await self.kv.create(key, crl.SerializeToString())
                except KeyWrongLastSequenceError:
                    continue
                return True
            current = ca_pb2.GetCRLResponse()
            current.ParseFromString(entry.value)
            if current.crl_number >= crl.crl_number:
                return False
            try:
                await self.kv.update(key, crl.SerializeToString(), last=entry.revision)
            except KeyWrongLastSequenceError:
                continue
            return True
        raise Internal("store.contention", "the CRL kept changing; try again")


async def store_with_fresh_serial(
    store: CAStore,
    make: Callable[[int], Awaitable[ca_pb2.CertificateRecord]],
    new_serial: Callable[[], int],
    attempts: int = 3,
) -> ca_pb2.CertificateRecord:
    """Sign (through `make`) and store under a fresh serial, retrying on a collision, so
    that a certificate exists outside the CA only once its record is stored."""
    for _ in range(attempts):
        record = await make(new_serial())
        try:
            await store.create_record(record)
        except AlreadyExists:
            log.warning("event=ca_serial_collision serial=%s", record.serial)
            await asyncio.sleep(0)
            continue
        return record
    raise Internal("cert.serial_exhausted", "could not find a free serial number")
