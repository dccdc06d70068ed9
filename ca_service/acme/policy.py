"""Which names the ACME server certifies: DNS suffixes and IP networks.

Anyone who can answer a challenge for a name gets a certificate for it, and the root
these certificates chain to sits in the trust store of every device in the house. So
ACME is kept to names that can only mean this network: by default `*.home.arpa`
(RFC 8375), `*.lan`, `*.local` and the private address ranges (RFC 1918, RFC 6598's
shared space is not among them, IPv6 unique-local fc00::/7). Names outside are
`rejectedIdentifier`, before any authorization is made. Wildcards need dns-01, which
this server does not offer: refused as well.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from ca_service.acme.problems import Malformed, RejectedIdentifier, UnsupportedIdentifier

DEFAULT_DNS_SUFFIXES = ("home.arpa", "lan", "local")
DEFAULT_IP_NETWORKS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
MAX_IDENTIFIERS = 100
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def normalize_dns(value: str) -> str:
    """Lower-cased, one trailing dot dropped; Malformed unless a fully qualified LDH name."""
    name = value.lower().removesuffix(".")
    if name.startswith("*."):
        raise RejectedIdentifier(
            "acme.wildcard_not_allowed", "wildcard names need dns-01, which is not offered"
        )
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise Malformed("acme.identifier_invalid", f"{value!r} is not a fully qualified DNS name")
    return name


@dataclass(frozen=True)
class NamePolicy:
    dns_suffixes: tuple[str, ...] = DEFAULT_DNS_SUFFIXES
    ip_networks: tuple[Network, ...] = tuple(ipaddress.ip_network(n) for n in DEFAULT_IP_NETWORKS)

    @classmethod
    def from_lists(cls, dns: list[str], ip: list[str]) -> NamePolicy:
        """From config lists; ValueError names the first bad entry."""
        suffixes: list[str] = []
        for entry in dns:
            suffix = entry.lower().removeprefix("*.").removeprefix(".").removesuffix(".")
            if not suffix or not all(_LABEL.match(label) for label in suffix.split(".")):
                raise ValueError(f"acme allow_dns entry {entry!r} is not a DNS suffix")
            suffixes.append(suffix)
        networks: list[Network] = []
        for entry in ip:
            try:
                networks.append(ipaddress.ip_network(entry))
            except ValueError:
                raise ValueError(f"acme allow_ip entry {entry!r} is not a network") from None
        return cls(tuple(suffixes), tuple(networks))

    def check(self, identifier: Any) -> tuple[str, str]:
        """(type, normalized value) of an ACME identifier object the policy allows."""
        if not isinstance(identifier, dict) or not isinstance(identifier.get("value"), str):
            raise Malformed("acme.identifier_invalid", "an identifier is {type, value}")
        kind, value = identifier.get("type"), identifier["value"]
        if kind == "dns":
            name = normalize_dns(value)
            if not any(name == s or name.endswith("." + s) for s in self.dns_suffixes):
                raise RejectedIdentifier(
                    "acme.name_outside_policy",
                    f"{name} is outside this CA's ACME names ({self.describe()})",
                )
            return "dns", name
        if kind == "ip":
            try:
                address = ipaddress.ip_address(value)
            except ValueError:
                raise Malformed(
                    "acme.identifier_invalid", f"{value!r} is not an IP address"
                ) from None
            if not any(address in net for net in self.ip_networks):
                raise RejectedIdentifier(
                    "acme.name_outside_policy",
                    f"{address} is outside this CA's ACME networks ({self.describe()})",
                )
            return "ip", str(address)
        raise UnsupportedIdentifier("acme.identifier_unsupported", "identifiers are dns or ip")

    def describe(self) -> str:
        names = ", ".join(f"*.{s}" for s in self.dns_suffixes)
        nets = ", ".join(str(n) for n in self.ip_networks)
        return "; ".join(part for part in (names, nets) if part) or "nothing"

    def to_json(self) -> dict[str, list[str]]:
        return {
            "dns": [f"*.{s}" for s in self.dns_suffixes],
            "ip": [str(n) for n in self.ip_networks],
        }
