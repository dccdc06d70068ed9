"""The `[acme]` table of the CA's config (ca_service.config) as the ACME server uses it.

[acme]
listen = "0.0.0.0:8555"              # HTTPS; without an [acme] table there is no ACME
names = ["ca.home.arpa", "192.168.1.2"]  # in the server's certificate (from the mini-CA)
base_url = "https://ca.home.arpa:8555"   # what clients reach; default: first name + port
profile = "https-server"             # the profile every ACME certificate is issued under
http01_port = 80                     # where http-01 is fetched (RFC 8555: 80)
tlsalpn01_port = 443                 # where tls-alpn-01 connects (RFC 8737: 443)
allow_dns = ["home.arpa", "lan", "local"]   # name policy: DNS suffixes
allow_ip = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]
eab_required = false                 # new accounts need an admin-made EAB key
order_retention_days = 30            # an order (and its authorizations) is deleted this
                                     # long after it expired (orders live 7 days)
[acme.hosts]                         # static resolver override for validation
"nas.home.arpa" = "127.0.0.1"
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from ca_service.acme.policy import DEFAULT_DNS_SUFFIXES, DEFAULT_IP_NETWORKS, NamePolicy

DEFAULT_LISTEN_PORT = 8555
MAX_BODY = 64 * 1024
KNOWN = frozenset(
    {
        "listen",
        "names",
        "base_url",
        "profile",
        "http01_port",
        "tlsalpn01_port",
        "allow_dns",
        "allow_ip",
        "eab_required",
        "hosts",
        "max_body",
        "order_retention_days",
    }
)
DEFAULT_ORDER_RETENTION_DAYS = 30
MAX_ORDER_RETENTION_DAYS = 3650


@dataclass(frozen=True)
class AcmeConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_LISTEN_PORT
    names: tuple[str, ...] = ("localhost.home.arpa", "127.0.0.1")
    base_url: str = ""
    profile: str = "https-server"
    http01_port: int = 80
    tlsalpn01_port: int = 443
    policy: NamePolicy = field(default_factory=NamePolicy)
    eab_required: bool = False
    hosts: dict[str, str] = field(default_factory=dict)
    max_body: int = MAX_BODY
    # Seconds after an order's expiry at which it and its authorizations are deleted: an
    # account's 50,000 finished orders must not stay in the CA's bucket for ever.
    order_retention: float = DEFAULT_ORDER_RETENTION_DAYS * 86400.0

    @property
    def directory_base(self) -> str:
        """https://host:port, without a trailing slash: every ACME URL starts with it."""
        if self.base_url:
            return self.base_url.rstrip("/")
        first = self.names[0]
        host = f"[{first}]" if ":" in first else first
        return f"https://{host}:{self.port}"

    @property
    def directory_url(self) -> str:
        return f"{self.directory_base}/acme/directory"


def _port(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ValueError(f"acme {name} must be a port number (1..65535)")
    return value


def _strings(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"acme {name} must be a list of strings")
    return list(value)


def parse_acme(raw: Any) -> AcmeConfig:
    """The [acme] table; ValueError with the first problem."""
    if not isinstance(raw, dict):
        raise ValueError("acme must be a table")
    unknown = sorted(set(raw) - KNOWN)
    if unknown:
        raise ValueError(f"unknown field acme.{unknown[0]}")
    host, sep, port = str(raw.get("listen", f"127.0.0.1:{DEFAULT_LISTEN_PORT}")).rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError("acme listen must be host:port")
    names = _strings(raw.get("names", ["localhost.home.arpa", "127.0.0.1"]), "names")
    if not names:
        raise ValueError("acme names must name the server at least once")
    hosts = raw.get("hosts", {})
    if not isinstance(hosts, dict):
        raise ValueError("acme hosts must be a table of name = address")
    for name, address in hosts.items():
        try:
            ipaddress.ip_address(str(address))
        except ValueError:
            raise ValueError(f"acme hosts {name!r}: {address!r} is not an IP address") from None
    base_url = raw.get("base_url", "")
    if not isinstance(base_url, str) or (base_url and not base_url.startswith("https://")):
        raise ValueError("acme base_url must be an https:// URL")
    eab = raw.get("eab_required", False)
    if not isinstance(eab, bool):
        raise ValueError("acme eab_required must be true or false")
    max_body = raw.get("max_body", MAX_BODY)
    if not isinstance(max_body, int) or not 4096 <= max_body <= 1024 * 1024:
        raise ValueError("acme max_body must be 4096 to 1048576 bytes")
    retention = raw.get("order_retention_days", DEFAULT_ORDER_RETENTION_DAYS)
    if (
        isinstance(retention, bool)
        or not isinstance(retention, int)
        or not 0 <= retention <= MAX_ORDER_RETENTION_DAYS
    ):
        raise ValueError(f"acme order_retention_days must be 0 to {MAX_ORDER_RETENTION_DAYS}")
    return AcmeConfig(
        host=host.strip("[]"),
        port=_port(int(port), "listen port"),
        names=tuple(n.lower() for n in names),
        base_url=base_url,
        profile=str(raw.get("profile", "https-server")),
        http01_port=_port(raw.get("http01_port", 80), "http01_port"),
        tlsalpn01_port=_port(raw.get("tlsalpn01_port", 443), "tlsalpn01_port"),
        policy=NamePolicy.from_lists(
            _strings(raw.get("allow_dns", list(DEFAULT_DNS_SUFFIXES)), "allow_dns"),
            _strings(raw.get("allow_ip", list(DEFAULT_IP_NETWORKS)), "allow_ip"),
        ),
        eab_required=eab,
        hosts={str(k).lower(): str(v) for k, v in hosts.items()},
        max_body=max_body,
        order_retention=retention * 86400.0,
    )
