"""Who may call what: the role table, then the key's own policy.

The role table is the floor: a role that may not sign cannot sign any key. A key's
policy, when it has rules, narrows further: the caller's role or client name must be
granted that operation (and, for signing, that algorithm) by one of its rules.
Administrators manage keys whatever their policy says, but sign and verify under it
like everyone else: a policy that names who may sign binds admins too.
"""

from __future__ import annotations

from broker.device_certs import DEVICE_METHODS
from edgekms.algorithms import ALGORITHMS, key_type_info
from edgekms.errors import InvalidArgument, PermissionDenied
from edgekms.identity import CLIENT_NAME_RE, ROLES, Identity
from edgekms.v1 import common_pb2 as pb

# The CertificateAuthority's RPCs (forwarded to kms.ca.*): operators run the CA day to
# day; only administrators create or replace the CA itself.
CA_READ = frozenset(
    {
        "GetCertificate",
        "ListCertificates",
        "GetCRL",
        "GetRootCRL",
        "GetIssuerCRL",
        "GetCACertificates",
        "ListProfiles",
    }
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
            "SignBatch",
            "SignStream",
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
        {
            "GetKey",
            "ListKeys",
            "GetPublicKey",
            "Sign",
            "SignBatch",
            "SignStream",
            "Verify",
            "GetStatus",
            "WhoAmI",
        }
    ),
    "enrollee": frozenset({"WhoAmI"}),
}
# Encryption: using a key (Encrypt, Decrypt, GenerateDataKey) is like signing, for the
# roles that sign; making a new version of a key (RotateKey) is managing it, like
# creating one: administrators and operators.
ROLE_METHODS["admin"] |= {"Encrypt", "Decrypt", "GenerateDataKey", "RotateKey"}
ROLE_METHODS["operator"] |= {"RotateKey"}
ROLE_METHODS["signer"] |= {"Encrypt", "Decrypt", "GenerateDataKey"}
# Rotating or revoking an intermediate replaces the CA itself, and pruning removes records
# for good: administrators only, like creating the CA.
ROLE_METHODS["admin"] |= CA_OPERATE | {"Init", "Rotate", "RevokeIntermediate", "PruneCertificates"}
ROLE_METHODS["operator"] |= CA_OPERATE
ROLE_METHODS["signer"] |= {"GetCACertificates", "GetCRL", "GetRootCRL", "GetIssuerCRL"}
# ACME administration: operators may look at accounts, keys and the policy; only
# administrators mint or revoke external account binding keys (they admit new accounts).
ACME_READ = frozenset({"ListAcmeAccounts", "ListAcmeEab", "GetAcmePolicy"})
ROLE_METHODS["admin"] |= ACME_READ | {"CreateAcmeEab", "RevokeAcmeEab"}
ROLE_METHODS["operator"] |= ACME_READ
# SPIFFE (docs/spiffe.md): administrators make the trust domain, operators manage
# registration entries; every role may read the bundle. SVIDs are signed only for an
# enrolled device's own entries (broker.device_certs.SPIFFE_DEVICE_METHODS).
SPIFFE_READ = frozenset({"SpiffeGetEntry", "SpiffeListEntries", "SpiffeGetBundle"})
SPIFFE_MANAGE = SPIFFE_READ | {"SpiffeCreateEntry", "SpiffeDeleteEntry"}
ROLE_METHODS["admin"] |= SPIFFE_MANAGE | {
    "SpiffeInit",
    "SpiffeFederate",
    "SpiffeUnfederate",
    "SpiffeRotate",
}
ROLE_METHODS["operator"] |= SPIFFE_MANAGE
ROLE_METHODS["signer"] |= {"SpiffeGetBundle"}
# Clients and key policies: only administrators change who may do what; operators may look.
ROLE_METHODS["admin"] |= {"AddClient", "ListClients", "RevokeClient", "UpdateKeyPolicy"}
ROLE_METHODS["operator"] |= {"ListClients"}
# Renewal by the holder: the caller's own client certificate (RenewClient, proved by the
# mutual TLS connection it renews) and mini-CA certificates whose key the caller proves
# it holds (RenewHeldCertificate): every role, since possession is the credential.
# Devices: enrollment tokens and deny/allow are administrators'; operators may look.
ROLE_METHODS["admin"] |= {
    "CreateEnrollToken",
    "ListEnrollTokens",
    "RevokeEnrollToken",
    "ListDevices",
    "GetDevice",
    "DenyDevices",
    "AllowDevices",
    "PutUnlockSecret",
    "ListUnlockSecrets",
    "GetUnlockSecret",
    "RemoveUnlockSecret",
}
ROLE_METHODS["operator"] |= {"ListDevices", "GetDevice", "ListUnlockSecrets", "GetUnlockSecret"}
for _role in ROLE_METHODS:
    ROLE_METHODS[_role] |= {"RenewClient", "RenewHeldCertificate"}
# The audit log: administrators and operators may read it (kmsctl audit tail/verify).
ROLE_METHODS["admin"] |= {"TailAudit"}
ROLE_METHODS["operator"] |= {"TailAudit"}

# Methods whose request names one key (`request.name`): a client registered with a key
# pattern may call them only for keys matching it (ListKeys is filtered instead).
KEY_SCOPED_METHODS = frozenset(
    {
        "CreateKey",
        "GetKey",
        "GetPublicKey",
        "Sign",
        "Verify",
        "DisableKey",
        "EnableKey",
        "DestroyKey",
        "AttestKey",
        "UpdateKeyPolicy",
        "Encrypt",
        "GenerateDataKey",
        "RotateKey",
        # Decrypt names its key in the envelope; `name` is optional there, so the broker
        # checks the envelope's name against the pattern itself (broker/keys.py).
    }
)

_MANAGEMENT = frozenset(
    {
        pb.KEY_OPERATION_GET_PUBLIC_KEY,
        pb.KEY_OPERATION_DISABLE,
        pb.KEY_OPERATION_ENABLE,
        pb.KEY_OPERATION_DESTROY,
        pb.KEY_OPERATION_ATTEST,
        pb.KEY_OPERATION_ROTATE,
    }
)


def check_method(identity: Identity, method: str, device: bool = False) -> None:
    """The role table's floor; `device`: the caller is an enrolled device, which may also
    call DEVICE_METHODS, each narrowed by its handler to the device's own names."""
    if device and method in DEVICE_METHODS:
        return
    if method not in ROLE_METHODS.get(identity.role, frozenset()):
        raise PermissionDenied(
            "authz.role_denied",
            f"role {identity.role!r} may not call {method}",
            {"client": identity.client, "role": identity.role, "method": method},
        )


# A key policy restricts who signs, not the administrator: admin keeps every management
# operation and verify on every key (verifying uses only the public key, which admin may
# read anyway), so a policy cannot lock the administrator out of a key. Signing stays
# with whom the policy names; an admin who must sign changes the policy, audited.
_ADMIN_KEEPS = _MANAGEMENT | {pb.KEY_OPERATION_VERIFY}


def check_key_policy(
    identity: Identity,
    record: pb.KeyRecord,
    operation: pb.KeyOperation.ValueType,
    algorithm: pb.SignatureAlgorithm.ValueType = pb.SIGNATURE_ALGORITHM_UNSPECIFIED,
) -> None:
    rules = record.policy.rules
    if not rules:
        return
    if identity.role == "admin" and operation in _ADMIN_KEEPS:
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


MAX_POLICY_RULES = 32
# Per rule: enough for any real policy, small enough that a whole record stays far below
# the bus's max_payload (an oversized record used to fail its KV write as INTERNAL).
MAX_RULE_CLIENTS = 64
MAX_RULE_ITEMS = 16


def check_policy_rules(policy: pb.KeyPolicy, key_type: pb.KeyType.ValueType) -> None:
    """A policy that names unknown things or could never match is a mistake: refuse it."""
    family = key_type_info(key_type).family
    if len(policy.rules) > MAX_POLICY_RULES:
        raise InvalidArgument("policy.too_many_rules", f"at most {MAX_POLICY_RULES} rules")
    for index, rule in enumerate(policy.rules):
        where = {"rule": str(index)}
        if (
            len(rule.clients) > MAX_RULE_CLIENTS
            or max(len(rule.roles), len(rule.operations), len(rule.algorithms)) > MAX_RULE_ITEMS
        ):
            raise InvalidArgument(
                "policy.rule_too_large",
                f"rule {index}: at most {MAX_RULE_CLIENTS} clients and {MAX_RULE_ITEMS}"
                " roles, operations or algorithms",
                where,
            )
        if not rule.roles and not rule.clients:
            raise InvalidArgument("policy.no_subject", f"rule {index} names nobody", where)
        for role in rule.roles:
            if role not in ROLES:
                raise InvalidArgument(
                    "policy.role_unknown", f"rule {index}: unknown role {role[:40]!r}", where
                )
        for client in rule.clients:
            if not CLIENT_NAME_RE.match(client):
                raise InvalidArgument(
                    "policy.client_invalid", f"rule {index}: bad client name {client[:70]!r}", where
                )
        if not rule.operations:
            raise InvalidArgument("policy.no_operation", f"rule {index} grants nothing", where)
        for op in rule.operations:
            if op == pb.KEY_OPERATION_UNSPECIFIED or op not in pb.KeyOperation.values():
                raise InvalidArgument(
                    "policy.operation_unknown", f"rule {index}: unknown operation {op}", where
                )
        for alg in rule.algorithms:
            info = ALGORITHMS.get(alg)
            if info is None:
                raise InvalidArgument(
                    "policy.algorithm_unknown", f"rule {index}: unknown algorithm {alg}", where
                )
            if info.family != family:
                raise InvalidArgument(
                    "policy.algorithm_mismatch",
                    f"rule {index}: {info.cli_name} cannot be used with this key",
                    where,
                )
