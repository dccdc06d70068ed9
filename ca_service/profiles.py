"""Certificate profiles: what each kind of certificate may contain and for how long.

A profile is the CA's whole policy for one use (HTTPS server, VPN server or client,
device). The built-ins are what nginx, browsers, OpenVPN (`remote-cert-tls`) and strongSwan
accept as they are; administrators add or override profiles in a TOML file. Everything a
request asks for is checked against its profile in ca_service.policy.
"""

from __future__ import annotations

import datetime
import ipaddress
import tomllib
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

from edgekms import sans
from edgekms.durations import check_ttl, parse_ttl
from edgekms.errors import InvalidArgument, KMSError

# Key types a CA will certify, as edgekms.algorithms spells them. RSA below 2048 and EC
# curves other than P-256/P-384 never appear here, so no profile can allow them.
CERTIFIABLE_KEY_TYPES = frozenset(
    {"ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519"}
)

EKU_NAMES: dict[str, ObjectIdentifier] = {
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "codeSigning": ExtendedKeyUsageOID.CODE_SIGNING,
    "emailProtection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "timeStamping": ExtendedKeyUsageOID.TIME_STAMPING,
    "OCSPSigning": ExtendedKeyUsageOID.OCSP_SIGNING,
    # RFC 4945 IKE intermediate: what Windows and macOS IKEv2 clients look for.
    "ipsecIKE": ObjectIdentifier("1.3.6.1.5.5.7.3.17"),
    "ikeIntermediate": ObjectIdentifier("1.3.6.1.5.5.8.2.2"),
}
_EKU_BY_OID = {v.dotted_string: k for k, v in EKU_NAMES.items()}

SAN_KINDS = ("dns", "ip", "email", "uri")


@dataclass(frozen=True)
class SanPolicy:
    """Which subject alternative names a profile admits, one allow-list per kind.

    DNS patterns: "*" any name; "*.example.com" one label under example.com;
    ".example.com" any depth under it; otherwise exact. IP: CIDR networks. Email and URI:
    shell-style patterns (fnmatch). An empty list admits nothing of that kind.
    """

    dns: tuple[str, ...] = ("*",)
    ip: tuple[str, ...] = ("0.0.0.0/0", "::/0")
    email: tuple[str, ...] = ()
    uri: tuple[str, ...] = ()

    def allows(self, kind: str, value: str) -> bool:
        if kind == "dns":
            return any(_dns_match(p.lower(), value.lower()) for p in self.dns)
        if kind == "ip":
            addr = ipaddress.ip_address(value)
            return any(addr in ipaddress.ip_network(p, strict=False) for p in self.ip)
        patterns = self.email if kind == "email" else self.uri
        return any(fnmatchcase(value.lower(), p.lower()) for p in patterns)


def _dns_match(pattern: str, name: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        suffix = pattern[1:]
        head = name[: -len(suffix)] if name.endswith(suffix) else ""
        return bool(head) and "." not in head
    if pattern.startswith("."):
        return name.endswith(pattern) and len(name) > len(pattern)
    return name == pattern


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    extended_key_usages: tuple[ObjectIdentifier, ...]
    key_types: frozenset[str]
    # Exact lifetimes (short-lived certificates go down to minutes); a request that names
    # none gets the default, one past the maximum is refused.
    max_validity: datetime.timedelta
    default_validity: datetime.timedelta
    san_required: bool = False
    sans: SanPolicy = field(default_factory=SanPolicy)
    # keyAgreement for EC keys (some IKE stacks want it); digitalSignature is always set
    # and keyEncipherment is added for RSA keys (TLS 1.2 RSA key exchange, OpenVPN).
    key_agreement: bool = False
    # Wildcard DNS names ("*.example.com"): off in the built-ins, since RFC 5280 does not
    # define them and pkilint's PKIX linter reports them as errors.
    allow_wildcards: bool = False

    @property
    def max_validity_days(self) -> int:
        """Whole days of max_validity (0 for a profile of hours), for display."""
        return self.max_validity // _DAY

    @property
    def default_validity_days(self) -> int:
        return self.default_validity // _DAY

    def eku_names(self) -> list[str]:
        return [_EKU_BY_OID.get(o.dotted_string, o.dotted_string) for o in self.extended_key_usages]


_DAY = datetime.timedelta(days=1)
_RSA = frozenset({"rsa-2048", "rsa-3072", "rsa-4096"})
_EC = frozenset({"ec-p256", "ec-p384"})

BUILTIN_PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            name="https-server",
            description="TLS web server (nginx, the NAS's HTTPS): serverAuth, DNS/IP SANs",
            extended_key_usages=(ExtendedKeyUsageOID.SERVER_AUTH,),
            key_types=_RSA | _EC,
            max_validity=_DAY * 398,
            # 90 days, as the public web is moving to: short enough that renewal is
            # routine (the agent renews on its own), long enough to survive a holiday.
            default_validity=_DAY * 90,
            san_required=True,
            sans=SanPolicy(dns=("*",), ip=("0.0.0.0/0", "::/0")),
        ),
        Profile(
            name="vpn-server",
            description="OpenVPN (remote-cert-tls server) and strongSwan gateway",
            extended_key_usages=(ExtendedKeyUsageOID.SERVER_AUTH, EKU_NAMES["ikeIntermediate"]),
            key_types=_RSA | _EC | {"ed25519"},
            max_validity=_DAY * 825,
            default_validity=_DAY * 730,
            san_required=True,
            sans=SanPolicy(dns=("*",), ip=("0.0.0.0/0", "::/0")),
        ),
        Profile(
            name="vpn-client",
            description="OpenVPN (remote-cert-tls client) and strongSwan road warrior",
            extended_key_usages=(ExtendedKeyUsageOID.CLIENT_AUTH,),
            key_types=_RSA | _EC | {"ed25519"},
            max_validity=_DAY * 825,
            default_validity=_DAY * 365,
            sans=SanPolicy(dns=("*",), ip=(), email=("*@*",)),
        ),
        Profile(
            name="device",
            description="A device that is both TLS client and server (mTLS to the broker)",
            extended_key_usages=(ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH),
            key_types=_RSA | _EC | {"ed25519"},
            max_validity=_DAY * 825,
            default_validity=_DAY * 365,
            sans=SanPolicy(dns=("*",), ip=("0.0.0.0/0", "::/0"), uri=("https://*",)),
        ),
    )
}


def _bad(msg: str, **details: str) -> InvalidArgument:
    return InvalidArgument("profile.invalid", msg, details)


def _str_list(table: dict[str, Any], key: str, where: str) -> tuple[str, ...] | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(f"{where}.{key} must be a list of strings", profile=where)
    return tuple(value)


def _profile_from_table(name: str, table: dict[str, Any]) -> Profile:
    known = {
        "description",
        "extends",
        "extended_key_usages",
        "key_types",
        "max_validity_days",
        "default_validity_days",
        "max_ttl",
        "default_ttl",
        "san_required",
        "key_agreement",
        "allow_wildcards",
        "sans",
    }
    unknown = set(table) - known
    if unknown:
        raise _bad(f"profile {name}: unknown settings {sorted(unknown)}", profile=name)
    base_name = table.get("extends")
    base: Profile | None = None
    if base_name is not None:
        if base_name not in BUILTIN_PROFILES:
            raise _bad(f"profile {name} extends unknown built-in {base_name!r}", profile=name)
        base = BUILTIN_PROFILES[base_name]

    ekus_raw = _str_list(table, "extended_key_usages", name)
    if ekus_raw is not None:
        ekus: tuple[ObjectIdentifier, ...] = tuple(_eku(name, e) for e in ekus_raw)
    elif base is not None:
        ekus = base.extended_key_usages
    else:
        raise _bad(f"profile {name}: extended_key_usages is required", profile=name)
    if not ekus:
        raise _bad(f"profile {name}: at least one extended key usage", profile=name)

    kt_raw = _str_list(table, "key_types", name)
    if kt_raw is not None:
        bad = set(kt_raw) - CERTIFIABLE_KEY_TYPES
        if bad:
            raise _bad(
                f"profile {name}: key types {sorted(bad)} cannot be certified "
                f"(allowed: {sorted(CERTIFIABLE_KEY_TYPES)})",
                profile=name,
            )
        key_types = frozenset(kt_raw)
    elif base is not None:
        key_types = base.key_types
    else:
        key_types = _RSA | _EC

    max_validity, default_validity = _lifetimes(name, table, base)

    san_required = table.get("san_required", base.san_required if base else False)
    key_agreement = table.get("key_agreement", base.key_agreement if base else False)
    wildcards = table.get("allow_wildcards", base.allow_wildcards if base else False)
    if not all(isinstance(v, bool) for v in (san_required, key_agreement, wildcards)):
        raise _bad(
            f"profile {name}: san_required, key_agreement, allow_wildcards are booleans",
            profile=name,
        )

    sans = base.sans if base else SanPolicy()
    san_table = table.get("sans")
    if san_table is not None:
        if not isinstance(san_table, dict) or set(san_table) - set(SAN_KINDS):
            raise _bad(f"profile {name}: [sans] takes only {list(SAN_KINDS)}", profile=name)
        lists = {k: _str_list(san_table, k, f"{name}.sans") for k in SAN_KINDS}
        for net in lists["ip"] or ():
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise _bad(f"profile {name}: {net!r} is not a network", profile=name) from None
        # A [sans] table replaces the allow-lists it names and empties the rest: what is
        # not written is not allowed.
        sans = SanPolicy(**{k: v or () for k, v in lists.items()})

    description = table.get("description", f"custom profile {name}")
    if not isinstance(description, str):
        raise _bad(f"profile {name}: description must be a string", profile=name)
    return Profile(
        name=name,
        description=description,
        extended_key_usages=ekus,
        key_types=key_types,
        max_validity=max_validity,
        default_validity=default_validity,
        san_required=san_required,
        sans=sans,
        key_agreement=key_agreement,
        allow_wildcards=wildcards,
    )


def _lifetime(
    name: str, table: dict[str, Any], days_key: str, ttl_key: str
) -> datetime.timedelta | None:
    """One lifetime setting, as whole days (`max_validity_days = 90`) or a duration
    (`max_ttl = "12h"`), never both."""
    if days_key in table and ttl_key in table:
        raise _bad(f"profile {name}: give {days_key} or {ttl_key}, not both", profile=name)
    if days_key in table:
        days = table[days_key]
        if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= 3650:
            raise _bad(f"profile {name}: {days_key} must be an integer in 1..3650", profile=name)
        return _DAY * days
    if ttl_key in table:
        text = table[ttl_key]
        if not isinstance(text, str):
            raise _bad(f'profile {name}: {ttl_key} must be a string like "12h"', profile=name)
        try:
            return parse_ttl(text)
        except KMSError as exc:
            raise _bad(f"profile {name}: {ttl_key}: {exc.message}", profile=name) from None
    return None


def _lifetimes(
    name: str, table: dict[str, Any], base: Profile | None
) -> tuple[datetime.timedelta, datetime.timedelta]:
    """(max, default): a default that is not given is min(max, the base's default or a
    year); a default above the maximum is refused."""
    max_validity = _lifetime(name, table, "max_validity_days", "max_ttl")
    default_validity = _lifetime(name, table, "default_validity_days", "default_ttl")
    if max_validity is None:
        max_validity = base.max_validity if base else _DAY * 365
    if default_validity is None:
        default_validity = min(max_validity, base.default_validity if base else _DAY * 365)
    if default_validity > max_validity:
        raise _bad(f"profile {name}: the default lifetime exceeds the maximum", profile=name)
    check_ttl(max_validity, "profile.invalid")
    return max_validity, default_validity


def _eku(profile: str, value: str) -> ObjectIdentifier:
    if value in EKU_NAMES:
        return EKU_NAMES[value]
    try:
        return ObjectIdentifier(value)
    except ValueError:
        raise _bad(
            f"profile {profile}: unknown extended key usage {value!r}", profile=profile
        ) from None


def parse_profiles(text: str) -> dict[str, Profile]:
    """Built-ins plus the `[profiles.<name>]` tables of a TOML document (which may
    override a built-in of the same name)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument("profile.toml_invalid", f"profile file is not TOML: {exc}") from None
    tables = doc.get("profiles", {})
    if not isinstance(tables, dict) or set(doc) - {"profiles"}:
        raise InvalidArgument("profile.toml_invalid", "expected only [profiles.<name>] tables")
    profiles = dict(BUILTIN_PROFILES)
    for name, table in tables.items():
        if not isinstance(table, dict) or not name.replace("-", "").replace("_", "").isalnum():
            raise _bad(f"profile {name!r}: expected a table with a plain name", profile=name)
        profiles[name] = _profile_from_table(name, table)
    return profiles


def load_profiles(path: Path | None) -> dict[str, Profile]:
    if path is None:
        return dict(BUILTIN_PROFILES)
    return parse_profiles(path.read_text())


def get_profile(profiles: dict[str, Profile], name: str) -> Profile:
    try:
        return profiles[name]
    except KeyError:
        raise InvalidArgument(
            "profile.unknown",
            f"no profile {name!r} (known: {', '.join(sorted(profiles))})",
            {"profile": name},
        ) from None


def san_strings(san: x509.SubjectAlternativeName) -> list[str]:
    """SANs as "kind:value" strings, the way records and logs show them."""
    return sans.san_strings(san, other=sans.other_repr)
