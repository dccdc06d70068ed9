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
    # User keys only: encryption keys are made by the broker for its clients.
    "Encrypt",
    "Decrypt",
)

# JetStream names: every bucket and stream, in one place, because the bus permissions
# (mgmt/natsauth.py) must name exactly what each service touches.
KEY_REGISTRY_BUCKET = "kms_keys"
IDEMPOTENCY_BUCKET = "kms_requests"
CLIENTS_BUCKET = "kms_clients"
CA_BUCKET = "kms_ca"
AUDIT_STREAM = "KMS_AUDIT"
# The registry names of the CA's keys: its root, its first intermediate, and one per
# rotation (ca/intermediate-2 ...). A KV key is one subject token, so the CA's bus grant
# lists each name; rotations stop at this generation (a 5-year intermediate: centuries).
CA_ROOT_KEY_NAME = "ca/root"
CA_INTERMEDIATE_KEY_NAME = "ca/intermediate"
CA_MAX_INTERMEDIATE_GENERATION = 99
# The SPIFFE trust domain's keys (ca_service/spiffe.py): its X.509 signing CA, its JWT key.
SPIFFE_CA_KEY_NAME = "ca/spiffe"
SPIFFE_JWT_KEY_NAME = "ca/spiffe-jwt"
# `kmsctl spiffe rotate` names each new pair ca/spiffe-N and ca/spiffe-jwt-N.
SPIFFE_MAX_GENERATION = 99


def spiffe_key_name(jwt: bool, generation: int) -> str:
    """The registry name of a SPIFFE key of a generation (1: the one `init` made)."""
    base = SPIFFE_JWT_KEY_NAME if jwt else SPIFFE_CA_KEY_NAME
    return base if generation <= 1 else f"{base}-{generation}"


def ca_registry_key_names() -> tuple[str, ...]:
    """Every registry name the CA service may record its own keys under."""
    return (
        CA_ROOT_KEY_NAME,
        CA_INTERMEDIATE_KEY_NAME,
        *(f"{CA_INTERMEDIATE_KEY_NAME}-{n}" for n in range(2, CA_MAX_INTERMEDIATE_GENERATION + 1)),
        *(
            spiffe_key_name(jwt, n)
            for jwt in (False, True)
            for n in range(1, SPIFFE_MAX_GENERATION + 1)
        ),
    )


# Key classes ("owners"): fixed when a key is generated, stored with the key in the token
# (or the TPM service's key record) and checked by the crypto service on every use. Each
# class has its own subjects, and the bus lets only the rightful identity publish there:
# `user` keys on kms.crypto.<provider>.<Op> (the broker), the mini-CA's on
# kms.crypto.<provider>.ca.<Op> (the CA service), the internal CA's on
# kms.crypto.<provider>.internal.<Op> (the bootstrap ceremony, and the broker issuing
# client certificates). docs/security.md, "Keys bound to their owners".
KEY_CLASS_USER = "user"
KEY_CLASS_CA = "ca"
KEY_CLASS_INTERNAL = "internal"
KEY_CLASSES = (KEY_CLASS_USER, KEY_CLASS_CA, KEY_CLASS_INTERNAL)
# What a non-user class may ask on its own subjects: make, read, use and drop its keys.
CLASS_OPERATIONS = ("GenerateKey", "GetPublicKey", "Sign", "DestroyKey")


def crypto_subject(provider: str, operation: str, key_class: str = KEY_CLASS_USER) -> str:
    """The subject of one operation for keys of one class (user keys keep the short form,
    three tokens, so `kms.crypto.*.<Op>` grants never reach another class's subjects)."""
    if key_class == KEY_CLASS_USER:
        return f"{CRYPTO_PREFIX}.{provider}.{operation}"
    if key_class not in KEY_CLASSES:
        raise ValueError(f"unknown key class {key_class!r}")
    return f"{CRYPTO_PREFIX}.{provider}.{key_class}.{operation}"


def class_operations(key_class: str) -> tuple[str, ...]:
    """The operations a crypto service answers for keys of `key_class`."""
    return CRYPTO_OPERATIONS if key_class == KEY_CLASS_USER else CLASS_OPERATIONS


def crypto_queue_group(provider: str) -> str:
    """Replicas of one provider share this queue group, so each request is answered once."""
    return f"{CRYPTO_PREFIX}.{provider}"


def crypto_service_name(provider: str) -> str:
    """The nats.micro service name; `$SRV.PING.<name>` reaches every replica."""
    return f"kms-crypto-{provider}"


def ca_subject(operation: str) -> str:
    return f"{CA_PREFIX}.{operation}"
