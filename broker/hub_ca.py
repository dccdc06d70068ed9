"""A fleet device's broker: its clients' certificate requests go to the hub's CA.

On a device configured with `hub_ca_device` (broker.toml) there is no local CA: the
broker sends IssueCertificate to the hub's CA on the device's own subject
(kms.ca.device.<id>.IssueCertificate, edgekms.fleet_ca) across the leaf connection, and
GetCACertificates / GetCRL to the hub CA's shared reads, on a bus connection whose inbox
prefix is the device's (the only replies the hub sends down). The hub's CA decides what
the device may have (its registry record); this broker still authenticates and
authorizes its own callers first, as for a local CA (broker.ca_forward). Every other CA
operation is refused here (`fleet.hub_ca_method`): the device's hub grant reaches none.
"""

# ruff: noqa: ASYNC109 - `timeout` bounds one NATS request to the hub; it is the API.

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from edgekms import natsrpc
from edgekms.errors import FailedPrecondition
from edgekms.fleet_ca import device_ca_subject
from edgekms.subjects import ca_subject
from edgekms.v1 import ca_pb2

# What a device's broker sends to the hub's CA; the device's hub grant holds these.
HUB_METHODS = ("IssueCertificate", "GetCACertificates", "GetCRL")


def hub_request_id(client: str, request_id: str) -> str:
    """The request id the hub sees for one local client's request id. The hub keys a
    device's certificates by the device and the id, so two clients of this broker using
    the same id must not get each other's certificate; a retry by the same client maps
    to the same id, and so to the same certificate. No id: a fresh one (no retry then)."""
    if not request_id:
        return secrets.token_hex(16)
    return hashlib.sha256(f"{client}\0{request_id}".encode()).hexdigest()


@dataclass(frozen=True)
class HubCA:
    """The hub's CA as this device reaches it: `nc` has the device's inbox prefix."""

    nc: Any
    device: str

    async def send(
        self,
        method: str,
        request: Message,
        response_type: type[Message],
        timeout: float,
        client: str,
    ) -> Message:
        if method == "IssueCertificate":
            assert isinstance(request, ca_pb2.IssueCertificateRequest)
            outgoing = ca_pb2.IssueCertificateRequest()
            outgoing.CopyFrom(request)
            outgoing.request_id = hub_request_id(client, request.request_id)
            subject = device_ca_subject(self.device, method)
            message: Message = outgoing
        elif method in HUB_METHODS:
            subject, message = ca_subject(method), request
        else:
            raise FailedPrecondition(
                "fleet.hub_ca_method",
                f"this device's certificates come from the hub's CA, which it may ask only "
                f"{', '.join(HUB_METHODS)}; {method} is the hub operator's",
                {"device": self.device, "method": method},
            )
        return await natsrpc.request(
            self.nc,
            subject,
            message,
            response_type,
            timeout,
            service="the hub's CA",
            reason_prefix="hub_ca",
            details={"device": self.device},
        )


__all__ = ["HUB_METHODS", "HubCA", "hub_request_id"]
