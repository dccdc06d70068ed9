"""Name constraints on the intermediate (RFC 5280 4.2.1.10) and the CA's own check of
every leaf against them before it signs.

The root a user imports into a browser vouches for whatever its intermediate signs;
constraining the intermediate to `home.arpa` and `192.168.0.0/16` means a stolen or
misused intermediate cannot make a certificate a verifier accepts for `www.google.com`.
Verifiers (openssl, GnuTLS, Go, browsers) enforce the extension themselves; the CA
refuses such a request first (typed error, nothing stored), so a refused name never
becomes a certificate that only a careful verifier would reject.
"""

from __future__ import annotations

import ipaddress
import re

from cryptography import x509

from edgekms.errors import InvalidArgument
from edgekms.v1 import ca_pb2

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# Subtrees per kind: the extension is read by every verifier on every handshake.
MAX_SUBTREES = 64


def _bad(message: str, value: str) -> InvalidArgument:
    return InvalidArgument("ca.name_constraint_invalid", message, {"value": value})


def _dns_subtree(value: str) -> str:
    name = value.strip().lower().removeprefix(".")
    if not name or len(name) > 253 or not all(_LABEL.match(p) for p in name.split(".")):
        raise _bad(f"{value!r} is not a DNS domain such as home.arpa", value)
    return name


def _ip_subtree(value: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError:
        raise _bad(f"{value!r} is not a network such as 192.168.0.0/16", value) from None


def build(spec: ca_pb2.NameConstraints) -> x509.NameConstraints | None:
    """The extension for a request's constraints, or None when it names none."""
    lists = (spec.permitted_dns, spec.permitted_ip, spec.excluded_dns, spec.excluded_ip)
    if not any(lists):
        return None
    if any(len(entries) > MAX_SUBTREES for entries in lists):
        raise _bad(f"at most {MAX_SUBTREES} entries of each kind", str(max(map(len, lists))))

    def subtrees(dns: list[str], ips: list[str]) -> list[x509.GeneralName] | None:
        names: list[x509.GeneralName] = [x509.DNSName(_dns_subtree(d)) for d in dns]
        names += [x509.IPAddress(_ip_subtree(i)) for i in ips]
        return names or None

    return x509.NameConstraints(
        permitted_subtrees=subtrees(list(spec.permitted_dns), list(spec.permitted_ip)),
        excluded_subtrees=subtrees(list(spec.excluded_dns), list(spec.excluded_ip)),
    )


def to_spec(ext: x509.NameConstraints | None) -> ca_pb2.NameConstraints:
    """The request form of an extension (what `kmsctl ca rotate` carries over)."""
    spec = ca_pb2.NameConstraints()
    if ext is None:
        return spec
    for names, dns, ips in (
        (ext.permitted_subtrees, spec.permitted_dns, spec.permitted_ip),
        (ext.excluded_subtrees, spec.excluded_dns, spec.excluded_ip),
    ):
        for name in names or ():
            if isinstance(name, x509.DNSName):
                dns.append(name.value)
            elif isinstance(name, x509.IPAddress):
                ips.append(str(name.value))
    return spec


def of_certificate(cert: x509.Certificate) -> x509.NameConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None


def _dns_within(name: str, subtree: str) -> bool:
    name = name.lower().removeprefix("*.")
    return name == subtree or name.endswith("." + subtree)


def _names(
    subject: x509.Name, san: x509.SubjectAlternativeName | None
) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """DNS names and IP addresses a verifier may hold against the constraints: the SANs,
    and a subject CN that looks like a host name (openssl and GnuTLS check it too)."""
    dns: list[str] = []
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for gn in san or ():
        if isinstance(gn, x509.DNSName):
            dns.append(gn.value)
        elif isinstance(gn, x509.IPAddress) and not isinstance(gn.value, IPNetwork):
            ips.append(gn.value)
    for attr in subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME):
        cn = attr.value if isinstance(attr.value, str) else ""
        try:
            ips.append(ipaddress.ip_address(cn))
            continue
        except ValueError:
            pass
        labels = cn.lower().split(".")
        if len(labels) > 1 and all(_LABEL.match(p) for p in labels):
            dns.append(cn.lower())
    return dns, ips


def check(
    ext: x509.NameConstraints | None,
    subject: x509.Name,
    san: x509.SubjectAlternativeName | None,
) -> None:
    """Refuse (InvalidArgument csr.name_outside_constraints) a leaf with a name the
    intermediate's constraints do not allow."""
    if ext is None:
        return
    dns, ips = _names(subject, san)
    permitted = list(ext.permitted_subtrees or ())
    excluded = list(ext.excluded_subtrees or ())

    def trees(names: list[x509.GeneralName], kind: type[x509.GeneralName]) -> list[object]:
        return [n.value for n in names if isinstance(n, kind)]

    def refuse(value: str) -> InvalidArgument:
        return InvalidArgument(
            "csr.name_outside_constraints",
            f"{value} is outside the names this CA may certify",
            {"san": value},
        )

    for name in dns:
        allowed = trees(permitted, x509.DNSName)
        if any(_dns_within(name, str(t)) for t in trees(excluded, x509.DNSName)):
            raise refuse(f"dns:{name}")
        if allowed and not any(_dns_within(name, str(t)) for t in allowed):
            raise refuse(f"dns:{name}")
    for addr in ips:
        allowed_nets = [t for t in trees(permitted, x509.IPAddress) if isinstance(t, IPNetwork)]
        barred = [t for t in trees(excluded, x509.IPAddress) if isinstance(t, IPNetwork)]
        if any(addr.version == n.version and addr in n for n in barred):
            raise refuse(f"ip:{addr}")
        if allowed_nets and not any(addr.version == n.version and addr in n for n in allowed_nets):
            raise refuse(f"ip:{addr}")
