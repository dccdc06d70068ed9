#!/usr/bin/env python3
"""Container health checks for the EdgeKMS stack (compose `healthcheck:`).

A crypto service is healthy when its nats.micro service answers `$SRV.PING`, asked
as the `kmsctl` bus identity (the one allowed readiness pings, mgmt.natsauth), which
proves the process and its NATS login at once. The broker and the CA are healthy when
their ports accept connections. Passwords are read from their files, never from argv.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import tomllib
from pathlib import Path

CONF_DIR = Path("/etc/edgekms")
DATA_DIR = Path("/var/lib/edgekms")


def port_open(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


PING_TIMEOUT = 2.0


async def micro_ping(settings: dict[str, str]) -> bool:
    import nats

    from mgmt.natsauth import local_credentials

    options = local_credentials(DATA_DIR).connect_options()
    nc = await nats.connect(
        settings["nats_url"],
        connect_timeout=PING_TIMEOUT,
        allow_reconnect=False,
        max_reconnect_attempts=0,
        **options,
    )
    try:
        await nc.request(f"$SRV.PING.kms-crypto-{settings['provider_id']}", b"", PING_TIMEOUT)
        return True
    except Exception:
        return False
    finally:
        await nc.close()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: edgekms-healthcheck crypto-hsm|crypto-tpm|ca|broker", file=sys.stderr)
        return 2
    role = argv[1]
    if role in ("crypto-hsm", "crypto-tpm"):
        name = "crypto-hsm0.toml" if role == "crypto-hsm" else "crypto-tpm0.toml"
        try:
            settings = tomllib.loads((CONF_DIR / name).read_text())
            ok = asyncio.run(micro_ping(settings))
        except Exception as exc:
            print(f"health role={role} error={type(exc).__name__}", file=sys.stderr)
            ok = False
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
