"""Finding the KMS on the LAN by multicast DNS (python-zeroconf): `kmsctl up --mdns`
announces the broker's enrollment listener as `_edgekms._tcp`, and `kmsctl unlock fetch
--mdns` looks it up when it has no address.

mDNS is unauthenticated: anyone on the link can answer. It only says where to connect;
the device still pins the internal CA by the fingerprint saved at enrollment, so a false
answer leads to a refused TLS handshake (`enroll.fingerprint_mismatch`), not to a secret.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any

SERVICE_TYPE = "_edgekms._tcp.local."


def _zeroconf(interfaces: list[str] | None) -> Any:
    from zeroconf import InterfaceChoice, IPVersion, Zeroconf

    if interfaces:
        return Zeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
    return Zeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only)


def _addresses(host: str, interfaces: list[str] | None) -> list[bytes]:
    """IPv4 addresses to announce: the listener's own, or (a wildcard) the interfaces'."""
    if host and host not in ("0.0.0.0", "::", ""):
        return [socket.inet_aton(socket.gethostbyname(host))]
    if interfaces:
        return [socket.inet_aton(i) for i in interfaces]
    import ifaddr

    found = [
        socket.inet_aton(str(ip.ip))
        for adapter in ifaddr.get_adapters()
        for ip in adapter.ips
        if isinstance(ip.ip, str) and not ip.ip.startswith("127.")
    ]
    return found or [socket.inet_aton("127.0.0.1")]


class Announcement:
    """A registered `_edgekms._tcp` service; `close()` withdraws it (goodbye packets)."""

    def __init__(self, name: str, host: str, port: int, interfaces: list[str] | None = None):
        from zeroconf import ServiceInfo

        label = name.replace(".", "-")[:63]
        self.info = ServiceInfo(
            SERVICE_TYPE,
            f"{label}.{SERVICE_TYPE}",
            addresses=_addresses(host, interfaces),
            port=port,
            properties={"role": "enroll", "v": "1"},
            server=f"{label}.local.",
        )
        self.zeroconf = _zeroconf(interfaces)
        self.zeroconf.register_service(self.info)

    def close(self) -> None:
        try:
            self.zeroconf.unregister_service(self.info)
        finally:
            self.zeroconf.close()


@dataclass(frozen=True)
class Found:
    name: str
    address: str
    port: int

    @property
    def server(self) -> str:
        return f"{self.address}:{self.port}"


def discover(timeout: float = 5.0, interfaces: list[str] | None = None) -> list[Found]:
    """Every `_edgekms._tcp` enrollment listener answering within `timeout` seconds."""
    from zeroconf import ServiceBrowser, ServiceListener

    names: list[str] = []

    class Listener(ServiceListener):
        def add_service(self, zc: Any, type_: str, name: str) -> None:
            names.append(name)

        def update_service(self, zc: Any, type_: str, name: str) -> None:
            pass

        def remove_service(self, zc: Any, type_: str, name: str) -> None:
            pass

    zeroconf = _zeroconf(interfaces)
    try:
        browser = ServiceBrowser(zeroconf, SERVICE_TYPE, Listener())
        deadline = time.monotonic() + timeout
        while not names and time.monotonic() < deadline:
            time.sleep(0.05)
        browser.cancel()
        found: list[Found] = []
        for name in names:
            info = zeroconf.get_service_info(SERVICE_TYPE, name, timeout=2000)
            if info is None or info.port is None:
                continue
            found += [Found(name, address, info.port) for address in info.parsed_addresses()]
        return found
    finally:
        zeroconf.close()
