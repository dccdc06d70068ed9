"""The gRPC CertificateAuthority service: each RPC forwarded to kms.ca.<RPC> over NATS.

The CA service (`kmsctl ca serve`) owns the logic and state; the broker adds what only
the ingress can: the caller's authenticated identity (written into `requester`, never
taken from the request), the role check, and error mapping. An enrolled device may ask
for certificates for its own names only (broker/device_certs.py). Handlers are built from the
service descriptor, so a new RPC in ca.proto is exposed without code here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import Message
from nats.aio.client import Client as NATS

from broker import wire
from broker.audit_service import note
from broker.authz import ROLE_METHODS
from broker.device_certs import DEVICE_METHODS, SPIFFE_DEVICE_METHODS, check_issue
from broker.hub_ca import HubCA
from broker.idempotency import IdempotencyStore
from broker.keys import Context, IdentityCache, rpc
from edgekms import natsrpc
from edgekms.audit import AuditWriter
from edgekms.errors import PermissionDenied
from edgekms.identity import Identity
from edgekms.subjects import ca_subject
from edgekms.v1 import ca_pb2

SERVICE = ca_pb2.DESCRIPTOR.services_by_name["CertificateAuthority"]
# Making CA keys in a token or TPM can take seconds; the rest answers quickly.
SLOW_METHODS = {
    "Init": 120.0,
    "Rotate": 120.0,
    "SpiffeInit": 120.0,
    "SpiffeFederate": 30.0,
    "SpiffeRotate": 120.0,
}
DEFAULT_TIMEOUT = 10.0
# Calls that change the CA's state: a retry with the same request_id is done once.
STATE_CHANGING = {
    "Init",
    "IssueCertificate",
    "RevokeCertificate",
    "RenewCertificate",
    "RenewHeldCertificate",
    "Rotate",
    "RevokeIntermediate",
    "PruneCertificates",
    "SpiffeInit",
    "SpiffeCreateEntry",
    "SpiffeDeleteEntry",
    "SpiffeFederate",
    "SpiffeRotate",
    "SpiffeUnfederate",
}

# State-changing calls whose work refuses a duplicate itself, so the broker writes no
# claim for them (broker.idempotency, claim=False): the CA derives an issued certificate's
# serial from the request id, stores it create-if-absent, and answers a retry with the
# stored certificate (or request.id_reused for another request under the same id).
SELF_DEDUPLICATING = frozenset({"IssueCertificate"})

# Where `requester` is a filter chosen by the caller (list what device X asked for), not
# the caller's name: left as given. Written over, it made every listing through the
# broker show only the caller's own certificates.
REQUESTER_FILTERS = frozenset({"ListCertificates"})


class CAForwarder:
    def __init__(
        self,
        nc: NATS,
        identities: IdentityCache,
        idempotency: IdempotencyStore | None = None,
        audit: AuditWriter | None = None,
        hub: HubCA | None = None,
    ):
        self.nc = nc
        # On a fleet device: the hub's CA, instead of a local one (broker.hub_ca).
        self.hub = hub
        # Read by the `rpc` wrapper: who is calling, and where every decision is recorded
        # (certificate issuance and revocation are changes the audit log must show).
        self.identities = identities
        self.idempotency = idempotency
        self.audit = audit

    def _forward(
        self, method: str, response_type: type[Message]
    ) -> Callable[[Message, Context], Any]:
        async def forward(
            self: CAForwarder, request: Message, context: Context, identity: Identity
        ) -> Message:
            if method in SPIFFE_DEVICE_METHODS:
                self._spiffe_node(method, request, identity)
            elif method in DEVICE_METHODS and method not in ROLE_METHODS.get(
                identity.role, frozenset()
            ):
                # Admitted by check_method only as an enrolled device: its own names only.
                device = self.identities.device(identity)
                if device is None:
                    raise PermissionDenied(
                        "authz.role_denied",
                        f"role {identity.role!r} may not call {method}",
                        {"client": identity.client, "role": identity.role, "method": method},
                    )
                assert isinstance(request, ca_pb2.IssueCertificateRequest)
                check_issue(device, request)
            if method not in REQUESTER_FILTERS and "requester" in request.DESCRIPTOR.fields_by_name:
                request.requester = identity.client  # type: ignore[attr-defined]
            ceiling = SLOW_METHODS.get(method, DEFAULT_TIMEOUT)
            remaining = context.time_remaining()
            timeout = ceiling if remaining is None else max(0.05, min(ceiling, remaining - 0.05))

            async def send() -> Message:
                if self.hub is not None:
                    return await self.hub.send(
                        method, request, response_type, timeout, identity.client
                    )
                return await natsrpc.request(
                    self.nc,
                    ca_subject(method),
                    request,
                    response_type,
                    timeout,
                    service="the CA service",
                    reason_prefix="ca",
                )

            if self.idempotency is None or method not in STATE_CHANGING:
                response = await send()
            else:
                response = await self.idempotency.run(
                    identity,
                    method,
                    request,
                    response_type,
                    send,
                    lease=timeout,
                    claim=method not in SELF_DEDUPLICATING,
                )
            record = getattr(response, "record", None)
            if record is not None and record.serial:
                note(serial=record.serial)  # an issuance's entry names what it issued
            return response

        return functools.partial(rpc(method)(forward), self)

    def _spiffe_node(self, method: str, request: Message, identity: Identity) -> None:
        """A device asks for its own node, whatever the request says; anyone else needs
        the role (administrators and operators list entries; nobody else signs SVIDs)."""
        device = self.identities.device(identity)
        if device is not None:
            request.node = device.name  # type: ignore[attr-defined]
        elif method not in ROLE_METHODS.get(identity.role, frozenset()):
            raise PermissionDenied(
                "authz.role_denied",
                f"role {identity.role!r} may not call {method}: only an enrolled device, "
                "for the workloads on it",
                {"client": identity.client, "role": identity.role, "method": method},
            )

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        def implementation(method: str) -> Callable[[Message, Context], Any]:
            output = SERVICE.methods_by_name[method].output_type.name
            return self._forward(method, getattr(ca_pb2, output))

        return wire.unary_handlers(SERVICE, ca_pb2, implementation)
