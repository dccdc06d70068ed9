"""The hub CA's fleet path: certificate requests from devices across their leaf links.

A device's hub user may publish only on its own kms.ca.device.<id>.> (mgmt.fleet), and
nats-server holds the leaf connection to that grant, so the <id> in the subject is the
authenticated device. This is the CA's only caller it checks itself (the broker checks
every other caller before forwarding): the device's record in the hub's registry
(edgekms.fleet_ca) must exist and be enabled, the profile must be one it is allowed, and
the CSR may name only the names recorded for it (edgekms.csr_names, the same check the
broker applies to an enrolled device). The certificate is recorded with requester
`fleet:<id>`, and its serial derives from that requester and the request id, so a retry
answers the same certificate and one device's ids cannot collide with another's. Every
answer, issued or refused, is an entry in the CA's audit chain naming the device.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.js import JetStreamContext

from ca_service.authority import CertificateAuthority
from ca_service.replies import reply_subject
from edgekms import natsrpc
from edgekms.audit import AuditWriter
from edgekms.busauth import INBOX_ROOT
from edgekms.csr_names import check_csr_names
from edgekms.errors import InvalidArgument, KMSError, PermissionDenied
from edgekms.fleet_ca import (
    REQUEST_ID_MAX,
    DeviceRecord,
    DeviceRegistry,
    device_ca_wildcard,
    device_inbox,
    device_requester,
    subject_device,
)
from edgekms.logs import fields
from edgekms.v1 import ca_pb2

log = logging.getLogger(__name__)

AUDIT_ACTION = "fleet.IssueCertificate"
AUDIT_ROLE = "fleet-device"


class DeviceCA:
    """Answers kms.ca.device.*.IssueCertificate for the devices the registry holds."""

    def __init__(self, ca: CertificateAuthority, js: JetStreamContext, audit: AuditWriter):
        self.ca = ca
        self.js = js
        self.audit = audit
        self._registry: DeviceRegistry | None = None

    async def _record(self, device: str) -> DeviceRecord:
        """The device's record, enabled; a typed refusal otherwise. The bucket is the
        operator's to make: until it exists no device is registered."""
        if self._registry is None:
            self._registry = await DeviceRegistry.existing(self.js)
        record = await self._registry.get(device) if self._registry is not None else None
        if record is None:
            raise PermissionDenied(
                "fleet.device_unknown",
                f"device {device!r} is not in the hub's device registry",
                {"device": device},
            )
        if not record.enabled:
            raise PermissionDenied(
                "fleet.device_disabled",
                f"device {device!r} is disabled in the hub's device registry",
                {"device": device},
            )
        return record

    async def _check(self, device: str, req: ca_pb2.IssueCertificateRequest) -> None:
        if not req.request_id or len(req.request_id) > REQUEST_ID_MAX:
            raise InvalidArgument(
                "fleet.request_id_invalid",
                f"a device's request needs a request_id of 1 to {REQUEST_ID_MAX} characters",
                {"device": device},
            )
        record = await self._record(device)
        if req.profile not in record.profiles:
            raise PermissionDenied(
                "device.profile_not_allowed",
                f"device {device!r} may ask for "
                f"{', '.join(sorted(record.profiles)) or 'no'} certificates, "
                f"not {req.profile[:40]!r}",
                {"device": device, "profile": req.profile[:40]},
            )
        check_csr_names(device, record.names, req.csr)

    async def issue(
        self, subject: str, req: ca_pb2.IssueCertificateRequest
    ) -> ca_pb2.IssueCertificateResponse:
        """Issue for the device the subject names, within its record; audited either way."""
        device = subject_device(subject)
        requester = device_requester(device)
        # Never taken from the request: the device is who the subject says.
        req.requester = requester
        details = {"device": device, "profile": req.profile[:40]}
        try:
            await self._check(device, req)
            response = await self.ca.issue(req)
        except KMSError as err:
            await self.audit.append(
                AUDIT_ACTION,
                "denied",
                client=requester,
                role=AUDIT_ROLE,
                request_id=req.request_id[:REQUEST_ID_MAX],
                details={**details, "code": err.code_name, "reason": err.reason},
            )
            raise
        await self.audit.append(
            AUDIT_ACTION,
            "ok",
            client=requester,
            role=AUDIT_ROLE,
            target=response.record.serial,
            request_id=req.request_id,
            details=details,
        )
        log.info(
            "fleet device certificate issued",
            extra=fields(device=device, serial=response.record.serial, profile=req.profile),
        )
        return response

    async def register(self, service: Any, responder: natsrpc.Responder) -> None:
        """Add the device endpoints to the CA's nats.micro service."""
        await service.add_endpoint(
            name="DeviceIssueCertificate",
            subject=device_ca_wildcard("IssueCertificate"),
            handler=self._endpoint(responder),
        )

    async def _misdirected(self, subject: str, reply: str) -> bool:
        """Whether a request's answer would go anywhere but the device's own inbox (the
        only replies its leaf connection carries down): then it is not answered, only
        audited, so that a device cannot have the CA publish into a hub subject."""
        try:
            device = subject_device(subject)
        except InvalidArgument:
            # No device: refused by `issue` (only a hub user reaches such a subject),
            # answered on an inbox only.
            return not reply.startswith(INBOX_ROOT)
        if reply.startswith(device_inbox(device) + "."):
            return False
        await self.audit.append(
            AUDIT_ACTION,
            "denied",
            client=device_requester(device),
            role=AUDIT_ROLE,
            details={"device": device, "reason": "fleet.reply_invalid", "reply": reply[:120]},
        )
        log.warning(
            "fleet device request with a reply outside its inbox dropped",
            extra=fields(device=device, reply=reply[:120]),
        )
        return True

    def _endpoint(self, responder: natsrpc.Responder) -> Callable[[Any], Awaitable[None]]:
        async def handle(req: Any) -> None:
            subject = str(req.subject)
            if await self._misdirected(subject, reply_subject(req)):
                return
            # The subject is per request, so the handler is bound to it here; the
            # Responder bounds concurrency and turns errors into typed answers.
            bound = functools.partial(self.issue, subject)
            await responder.endpoint(
                "DeviceIssueCertificate", ca_pb2.IssueCertificateRequest, bound
            )(req)

        return handle


__all__ = ["DeviceCA"]
