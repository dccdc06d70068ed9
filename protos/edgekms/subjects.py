"""NATS subject names and service names: the routing half of the wire contract."""

from __future__ import annotations

import re

CRYPTO_PREFIX = "kms.crypto"
CA_PREFIX = "kms.ca"
AUDIT_PREFIX = "kms.audit"  # each audit writer publishes on kms.audit.<writer>
CA_SERVICE_NAME = "kms-ca"  # the CA's nats.micro name: $SRV.PING.kms-ca reaches it
# Provider ids become subject tokens and micro service names: keep them plain.
PROVIDER_ID_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")

# Operations a crypto service answers, in the order its endpoints are registered.
CRYPTO_OPERATIONS = (
    "GenerateKey",
    "GetPublicKey",
    "Sign",
    "SignBatch",
    "Verify",
    "DestroyKey",
    "ListKeys",
    "Attest",
)

# JetStream names: every bucket and stream, in one place, because the bus permissions
# (mgmt/natsauth.py) must name exactly what each service touches.
KEY_REGISTRY_BUCKET = "kms_keys"
IDEMPOTENCY_BUCKET = "kms_requests"
CLIENTS_BUCKET = "kms_clients"
CA_BUCKET = "kms_ca"
AUDIT_STREAM = "KMS_AUDIT"


def crypto_subject(provider: str, operation: str) -> str:
    return f"{CRYPTO_PREFIX}.{provider}.{operation}"


def crypto_queue_group(provider: str) -> str:
    """Replicas of one provider share this queue group, so each request is answered once."""
    return f"{CRYPTO_PREFIX}.{provider}"


def crypto_service_name(provider: str) -> str:
    """The nats.micro service name; `$SRV.PING.<name>` reaches every replica."""
    return f"kms-crypto-{provider}"


def ca_subject(operation: str) -> str:
    return f"{CA_PREFIX}.{operation}"
