#!/usr/bin/env python3
"""Container health checks for the EdgeKMS stack (compose `healthcheck:`).

A crypto service is healthy while it holds an established connection to the bus port
its config names. It cannot be asked over NATS: its identity may publish only replies
(mgmt.natsauth), and lending it another identity's password would undo the per-service
secrets. nats-server closes a connection whose login fails, and kms-crypto exits when it
loses the bus for good, so a lasting connection means "logged in and serving". The
broker and the CA are healthy when their ports accept connections; nats-server when its
monitoring endpoint says JetStream is up.

The checks are what compose's `healthcheck:` runs where the engine schedules them
(Docker), and what the test harness runs by `exec` where it does not (podman without
systemd): readiness never depends on the scheduler (docker/wait.py).
"""

from __future__ import annotations

import socket
import sys
import tomllib
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

CONF_DIR = Path("/etc/edgekms")
PROC_TCP = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
TCP_ESTABLISHED = "01"


def port_open(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def established_to(port: int, tables: Iterable[Path] = PROC_TCP) -> bool:
    """Whether some socket of this network namespace is connected to remote `port`."""
    for table in tables:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 3 and cols[3] == TCP_ESTABLISHED:
                remote_port = cols[2].rpartition(":")[2]
                if int(remote_port, 16) == port:
                    return True
    return False


def nats_healthy(url: str = "http://127.0.0.1:8222/healthz?js-enabled-only=true") -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:  # noqa: S310 (fixed URL)
            return bool(response.status == 200)
    except OSError:
        return False


def bus_port(config: Path) -> int:
    url = tomllib.loads(config.read_text())["nats_url"]
    return urlsplit(url).port or 4222


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: edgekms-healthcheck nats|crypto-hsm|crypto-tpm|ca|broker", file=sys.stderr)
        return 2
    role = argv[1]
    if role in ("crypto-hsm", "crypto-tpm"):
        name = "crypto-hsm0.toml" if role == "crypto-hsm" else "crypto-tpm0.toml"
        try:
            ok = established_to(bus_port(CONF_DIR / name))
        except (OSError, KeyError, ValueError, tomllib.TOMLDecodeError) as exc:
            print(f"health role={role} error={type(exc).__name__}", file=sys.stderr)
            ok = False
    elif role == "nats":
        ok = nats_healthy()
    elif role == "ca":
        ok = port_open("127.0.0.1", 8080)
    elif role == "broker":
        ok = port_open("127.0.0.1", 8443)
    else:
        print(f"health role={role} unknown", file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
