"""The hub's side of a fleet: each device's bus user, and what its leaf connection may do.

A device's nats-server logs in to the hub's leaf listener as the device's own hub user
(mgmt.natsserver.HubLeafListen); nats-server then holds the whole leaf connection to that
user's permissions, read from the hub's point of view: `publish` is what the device may
send into the hub, `subscribe` what the hub may send down to the device. A compromised
device must not read another device's audit, write the hub's buckets or streams, reach
the hub's JetStream API or the CA's shared state-changing operations, so the grant is narrow
(docs/cluster.md, "Fleet", and docs/security.md):

- publish: its own sourcing deliver prefix (kms.fleet.<id>.src.>: the audit entries the
  hub's copy pulls), replies to the hub's internal JetStream requests ($JSC.R.>: the
  answer to "create the source consumer"), and the CA's read-only operations a device
  needs to trust the hub (the CA chain and the CRL), and its own per-device CA subject
  kms.ca.device.<id>.IssueCertificate (ca_service.fleet: its registered names only);
  replies to those come back on the device's own inbox prefix;
- subscribe: its own domain's JetStream API ($JS.dev-<id>.API.>: the hub's sourcing
  consumer), flow control of sourcing ($JS.FC.>: empty messages; nats-server names these
  subjects after the stream, not the domain, so they cannot be narrowed per device), and
  its inbox.
"""

from __future__ import annotations

from edgekms.fleet import check_device, deliver_prefix, device_domain
from edgekms.fleet_ca import DEVICE_OPERATIONS, device_ca_subject, device_inbox
from edgekms.subjects import ca_subject
from mgmt.natsauth import Identity, Permissions

# The CA's shared operations a device may call across the leaf connection: reads that
# tell it whom to trust. The shared issuing subjects trust whoever reaches them (a
# broker authenticates callers first), so a device asks for certificates on its own
# per-device subjects instead (device_hub_ca_subjects), where the CA checks it.
DEVICE_CA_OPERATIONS = ("GetCACertificates", "GetCRL")


def device_user(device: str) -> str:
    """The device's bus user at the hub."""
    return f"leaf-{check_device(device)}"


def device_hub_ca_subjects(device: str) -> tuple[str, ...]:
    """The hub CA's subjects for this device only (kms.ca.device.<id>.<Op>): the CA takes
    the device from the subject, so granting a device only its own is what authenticates
    it there (ca_service.fleet applies the registry's policy)."""
    return tuple(device_ca_subject(device, op) for op in DEVICE_OPERATIONS)


def device_identity(device: str) -> Identity:
    """The hub user a device's leaf connection logs in as, with its narrow grant."""
    domain = device_domain(device)
    return Identity(
        device_user(device),
        Permissions(
            publish=(
                f"{deliver_prefix(device)}.>",
                "$JSC.R.>",
                *(ca_subject(op) for op in DEVICE_CA_OPERATIONS),
                *device_hub_ca_subjects(device),
            ),
            subscribe=(f"$JS.{domain}.API.>", "$JS.FC.>", f"{device_inbox(device)}.>"),
        ),
        f"fleet device {device}: sources its audit into the hub, reads the CA chain and CRL,"
        " asks the CA for certificates for its own names",
    )


__all__ = [
    "DEVICE_CA_OPERATIONS",
    "device_hub_ca_subjects",
    "device_identity",
    "device_inbox",
    "device_user",
]
