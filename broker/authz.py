"""Who may call what: the role table, then the key's own policy.

The role table is the floor: a role that may not sign cannot sign any key. A key's
policy, when it has rules, narrows further: the caller's role or client name must be
granted that operation (and, for signing, that algorithm) by one of its rules.
Administrators manage keys whatever their policy says, but sign and verify under it
like everyone else: a policy that names who may sign binds admins too.
"""

from __future__ import annotations

from edgekms.errors import PermissionDenied
from edgekms.identity import Identity
from edgekms.v1 import common_pb2 as pb

# The CertificateAuthority's RPCs (forwarded to kms.ca.*): operators run the CA day to
# day; only administrators create or replace the CA itself.
CA_READ = frozenset(
    {"GetCertificate", "ListCertificates", "GetCRL", "GetCACertificates", "ListProfiles"}
)
CA_OPERATE = CA_READ | {"IssueCertificate", "RevokeCertificate", "RenewCertificate"}

# Broker methods (the gRPC method name) each role may call.
ROLE_METHODS: dict[str, frozenset[str]] = {
    "admin": frozenset(
        {
            "CreateKey",
            "GetKey",
            "ListKeys",
            "GetPublicKey",
            "Sign",
            "Verify",
            "DisableKey",
            "EnableKey",
            "DestroyKey",
            "AttestKey",
            "GetStatus",
            "WhoAmI",
        }
    ),
    "operator": frozenset(
        {
            "CreateKey",
            "GetKey",
            "ListKeys",
            "GetPublicKey",
            "Verify",
            "DisableKey",
            "EnableKey",
            "AttestKey",
            "GetStatus",
            "WhoAmI",
        }
    ),
    "signer": frozenset(
        {"GetKey", "ListKeys", "GetPublicKey", "Sign", "Verify", "GetStatus", "WhoAmI"}
    ),
    "enrollee": frozenset({"WhoAmI"}),
}
ROLE_METHODS["admin"] |= CA_OPERATE | {"Init"}
ROLE_METHODS["operator"] |= CA_OPERATE
ROLE_METHODS["signer"] |= {"GetCACertificates", "GetCRL"}

_MANAGEMENT = frozenset(
    {
        pb.KEY_OPERATION_GET_PUBLIC_KEY,
        pb.KEY_OPERATION_DISABLE,
        pb.KEY_OPERATION_ENABLE,
        pb.KEY_OPERATION_DESTROY,
        pb.KEY_OPERATION_ATTEST,
    }
)


def check_method(identity: Identity, method: str) -> None:
    if method not in ROLE_METHODS.get(identity.role, frozenset()):
        raise PermissionDenied(
            "authz.role_denied",
            f"role {identity.role!r} may not call {method}",
            {"client": identity.client, "role": identity.role, "method": method},
        )


def check_key_policy(
    identity: Identity,
    record: pb.KeyRecord,
    operation: pb.KeyOperation.ValueType,
    algorithm: pb.SignatureAlgorithm.ValueType = pb.SIGNATURE_ALGORITHM_UNSPECIFIED,
) -> None:
    rules = record.policy.rules
    if not rules:
        return
    if identity.role == "admin" and operation in _MANAGEMENT:
        return
    for rule in rules:
        if identity.role not in rule.roles and identity.client not in rule.clients:
            continue
        if operation not in rule.operations:
            continue
        if algorithm and rule.algorithms and algorithm not in rule.algorithms:
            continue
        return
    op = pb.KeyOperation.Name(operation).removeprefix("KEY_OPERATION_").lower()
    raise PermissionDenied(
        "authz.policy_denied",
        f"the policy of key {record.name!r} does not let {identity.client!r} {op}",
        {"client": identity.client, "key": record.name, "operation": op},
    )
