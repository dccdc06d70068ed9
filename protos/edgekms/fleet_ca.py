"""A fleet device's certificate requests to the hub's CA, across its leaf connection.

The hub's CA answers per-device subjects, kms.ca.device.<id>.<Operation>. A device's hub
user may publish only on its own (mgmt.fleet.device_hub_ca_subjects), and nats-server
holds the whole leaf connection to that user's grant, so the <id> in the subject IS the
authenticated device: the CA derives the device from the subject, never from the
request. What the device may get is its record in the hub's device registry (the KV
bucket kms_fleet_devices, one key per device, written by the hub's operator and only
read by the CA): the names (`dns:`/`ip:`) it may certify, the profiles it may ask for
(a subset of DEVICE_PROFILES) and whether it is enabled.

This module is the wire half (subjects, the record, its bucket) and the device's side
(`request_certificate`); the policy is the CA's (ca_service.fleet).
"""

# ruff: noqa: ASYNC109 - `timeout` bounds one NATS request to the hub; it is the API.

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from edgekms import natsrpc
from edgekms.errors import InvalidArgument, NotFound
from edgekms.fleet import check_device
from edgekms.kvstore import BucketSpec, open_kv
from edgekms.subjects import CA_PREFIX
from edgekms.v1 import ca_pb2

DEVICE_SUBJECT_PREFIX = f"{CA_PREFIX}.device"
# What a device may ask the hub's CA for: a certificate for its own names. Not renewal
# by serial, revocation or anything administrative (a new IssueCertificate with a fresh
# key is how a device renews; the operator revokes).
DEVICE_OPERATIONS = ("IssueCertificate",)
FLEET_DEVICES_BUCKET = "kms_fleet_devices"
FLEET_DEVICES_SPEC = BucketSpec(
    FLEET_DEVICES_BUCKET, "EdgeKMS fleet device registry: names, profiles, enabled"
)
# The mini-CA profiles a fleet device may be allowed (as for an enrolled device,
# broker.device_certs.CA_PROFILES["device"]); never a broker or client identity.
DEVICE_PROFILES = frozenset({"https-server", "vpn-server", "vpn-client"})
MAX_DEVICE_NAMES = 64
MAX_NAME_LENGTH = 253
# A retry of the same request answers the same certificate (the CA derives the serial
# from the device and the request id), so a device should always send one.
REQUEST_ID_MAX = 128


def device_ca_subject(device: str, operation: str) -> str:
    """kms.ca.device.<id>.<Operation>: where device <id> asks the hub's CA."""
    return f"{DEVICE_SUBJECT_PREFIX}.{check_device(device)}.{operation}"


def device_ca_wildcard(operation: str) -> str:
    """The subject the CA listens on for `operation` from every device."""
    return f"{DEVICE_SUBJECT_PREFIX}.*.{operation}"


def subject_device(subject: str) -> str:
    """The device a kms.ca.device.<id>.<Op> subject names (checked), else
    InvalidArgument("fleet.device_invalid")."""
    parts = subject.split(".")
    if len(parts) != 5 or ".".join(parts[:3]) != DEVICE_SUBJECT_PREFIX:
        raise InvalidArgument("fleet.device_invalid", "not a device subject of the hub's CA")
    return check_device(parts[3])


def device_inbox(device: str) -> str:
    """The inbox prefix a device-side client uses for requests into the hub (nats.py's
    `inbox_prefix`): the only replies the hub may send down to this device, and the only
    reply subjects the hub's CA answers a device's request on."""
    return f"_INBOX_{check_device(device)}"


def device_requester(device: str) -> str:
    """The requester recorded on a fleet device's certificates (and its audit client)."""
    return f"fleet:{check_device(device)}"


@dataclass(frozen=True)
class DeviceRecord:
    """One device's entry in the hub's registry."""

    device: str
    names: tuple[str, ...]
    profiles: tuple[str, ...]
    enabled: bool = True

    def __post_init__(self) -> None:
        check_device(self.device)
        if len(self.names) > MAX_DEVICE_NAMES:
            raise InvalidArgument(
                "fleet.names_invalid", f"at most {MAX_DEVICE_NAMES} names per device"
            )
        for name in self.names:
            kind, _, value = name.partition(":")
            if kind not in ("dns", "ip") or not value or len(value) > MAX_NAME_LENGTH:
                raise InvalidArgument(
                    "fleet.names_invalid",
                    f"{name[:80]!r} is not a device name: dns:NAME or ip:ADDRESS",
                    {"device": self.device},
                )
        unknown = sorted(set(self.profiles) - DEVICE_PROFILES)
        if unknown:
            raise InvalidArgument(
                "fleet.profile_invalid",
                f"profile {unknown[0][:40]!r} is not one a device may be allowed "
                f"({', '.join(sorted(DEVICE_PROFILES))})",
                {"device": self.device},
            )

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "device": self.device,
                "names": list(self.names),
                "profiles": list(self.profiles),
                "enabled": self.enabled,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> DeviceRecord:
        """The record, or InvalidArgument("fleet.record_invalid") for anything else."""
        try:
            data: Any = json.loads(raw)
            names, profiles, enabled = data["names"], data["profiles"], data["enabled"]
            if not (
                isinstance(names, list)
                and isinstance(profiles, list)
                and all(isinstance(x, str) for x in names + profiles)
                and isinstance(enabled, bool)
                and isinstance(data["device"], str)
            ):
                raise TypeError
            return cls(data["device"], tuple(names), tuple(profiles), enabled)
        except (ValueError, TypeError, KeyError):
            # (A well-formed record with a bad value raises its own InvalidArgument.)
            raise InvalidArgument(
                "fleet.record_invalid", "the device's registry record is unreadable"
            ) from None


class DeviceRegistry:
    """The hub's device registry (one KV key per device id). The operator writes it
    (`put`, `set_enabled`, `remove`); the CA only reads (`get`)."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext, replicas: int = 1) -> DeviceRegistry:
        """Open the bucket, making it if missing (the operator's side)."""
        return cls(await open_kv(js, FLEET_DEVICES_SPEC, replicas))

    @classmethod
    async def existing(cls, js: JetStreamContext) -> DeviceRegistry | None:
        """The bucket if the operator made it (the CA's side: it never creates it)."""
        try:
            return cls(await js.key_value(FLEET_DEVICES_BUCKET))
        except nats.js.errors.BucketNotFoundError:
            return None

    async def put(self, record: DeviceRecord) -> None:
        await self.kv.put(record.device, record.to_json())

    async def get(self, device: str) -> DeviceRecord | None:
        """The device's record, or None if it is not registered (or was removed)."""
        try:
            entry = await self.kv.get(check_device(device))
        except nats.js.errors.KeyNotFoundError:  # also KeyDeletedError
            return None
        record = DeviceRecord.from_json(entry.value or b"")
        if record.device != device:
            raise InvalidArgument(
                "fleet.record_invalid", "the registry record names another device"
            )
        return record

    async def set_enabled(self, device: str, enabled: bool) -> DeviceRecord:
        record = await self.get(device)
        if record is None:
            raise NotFound("fleet.device_unknown", f"device {device!r} is not registered")
        changed = DeviceRecord(record.device, record.names, record.profiles, enabled)
        await self.put(changed)
        return changed

    async def remove(self, device: str) -> None:
        await self.kv.delete(check_device(device))


async def request_certificate(
    nc: Client,
    device: str,
    request: ca_pb2.IssueCertificateRequest,
    timeout: float = 10.0,
) -> ca_pb2.IssueCertificateResponse:
    """Ask the hub's CA, from a connection on the device's own nats-server (with the
    device's inbox prefix, mgmt.fleet.device_inbox), for a certificate. Refusals come
    back typed as the CA raised them; with the uplink down nothing answers:
    Unavailable("hub_ca.unavailable") (or DeadlineExceeded "hub_ca.deadline")."""
    if not request.request_id or len(request.request_id) > REQUEST_ID_MAX:
        raise InvalidArgument(
            "fleet.request_id_invalid",
            f"a request to the hub's CA needs a request_id of 1 to {REQUEST_ID_MAX} characters,"
            " so that a retry answers the same certificate",
        )
    return await natsrpc.request(
        nc,
        device_ca_subject(device, "IssueCertificate"),
        request,
        ca_pb2.IssueCertificateResponse,
        timeout,
        service="the hub's CA",
        reason_prefix="hub_ca",
        details={"device": device},
    )


__all__ = [
    "DEVICE_OPERATIONS",
    "DEVICE_PROFILES",
    "FLEET_DEVICES_BUCKET",
    "DeviceRecord",
    "DeviceRegistry",
    "device_ca_subject",
    "device_ca_wildcard",
    "device_inbox",
    "device_requester",
    "request_certificate",
    "subject_device",
]
