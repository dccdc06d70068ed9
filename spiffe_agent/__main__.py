"""The SPIFFE agent's process: `kmsctl spiffe agent ...` execs `python -m spiffe_agent`.

Like `kmsctl agent`, the CLI parses its options and replaces itself (same pid) with this
interpreter, which loads only what the agent needs. Its arguments are exactly the ones
kmsctl passes.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

EXIT_USAGE = 2
EXIT_FAILED_PRECONDITION = 6
# kmsctl's exit codes by error code (mgmt.cli.common.ExitCode; not imported: click).
EXIT_CODES = {
    "ERROR_CODE_INVALID_ARGUMENT": 3,
    "ERROR_CODE_NOT_FOUND": 4,
    "ERROR_CODE_FAILED_PRECONDITION": EXIT_FAILED_PRECONDITION,
    "ERROR_CODE_PERMISSION_DENIED": 7,
    "ERROR_CODE_UNAUTHENTICATED": 7,
    "ERROR_CODE_UNAVAILABLE": 8,
}
DEFAULT_SOCKET = "unix:///run/edgekms/workload.sock"
USAGE = (
    "usage: python -m spiffe_agent --client-config PATH [--socket unix:///PATH]"
    " [--sync-interval SECONDS] [--log-level LEVEL]"
)

log = logging.getLogger("spiffe_agent")


def socket_path(address: str) -> Path:
    """SPIFFE_ENDPOINT_SOCKET's forms: unix:///path, unix:/path, or a bare path."""
    for prefix in ("unix://", "unix:"):
        if address.startswith(prefix):
            address = address[len(prefix) :]
            break
    if not address.startswith("/"):
        raise ValueError(f"the socket must be an absolute unix path, not {address!r}")
    return Path(address)


def parse_args(argv: Sequence[str]) -> tuple[Path, Path, float, str]:
    client_config, address, interval, level = "", DEFAULT_SOCKET, 30.0, "info"
    rest = list(argv)
    while rest:
        name = rest.pop(0)
        if name not in ("--client-config", "--socket", "--sync-interval", "--log-level"):
            raise ValueError(f"unexpected argument {name!r}")
        if not rest:
            raise ValueError(f"{name} needs a value")
        value = rest.pop(0)
        if name == "--client-config":
            client_config = value
        elif name == "--socket":
            address = value
        elif name == "--sync-interval":
            interval = float(value)
            if not 0.2 <= interval <= 3600:
                raise ValueError("--sync-interval is 0.2..3600 seconds")
        else:
            level = value
    if not client_config:
        raise ValueError("--client-config is required")
    return Path(client_config), socket_path(address), interval, level


async def serve(client_config: Path, public: Path, interval: float, stop: asyncio.Event) -> None:
    import grpc

    from edgekms.client import KMSClient
    from edgekms.v1 import workload_pb2_grpc
    from spiffe_agent.attest import Attestor
    from spiffe_agent.gate import Gate, claim_socket_path
    from spiffe_agent.svids import Identities
    from spiffe_agent.workload import WorkloadAPI

    # Before anything is made: a path another agent serves (or a file) is refused.
    claim_socket_path(public)
    kms = KMSClient.from_config(client_config, timeout=10.0)
    identities = Identities(kms, interval)
    private = Path(tempfile.mkdtemp(prefix="edgekms-spiffe-"))  # 0700
    gate = Gate(public, private, Attestor())
    server = grpc.aio.server()
    workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(
        WorkloadAPI(identities, gate.caller), server
    )
    server.add_insecure_port(f"unix:{gate.inner}")
    await server.start()
    await gate.start()
    tasks = [
        asyncio.create_task(identities.run_sync()),
        asyncio.create_task(identities.run_rotation()),
    ]
    log.info("event=spiffe_agent_started socket=%s sync_interval=%.1f", public, interval)
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await gate.stop()
        await server.stop(grace=1.0)
        kms.close()
        shutil.rmtree(private, ignore_errors=True)
        log.info("event=spiffe_agent_stopped")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        client_config, public, interval, level = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"kmsctl: spiffe agent: {exc}\n{USAGE}", file=sys.stderr)
        return EXIT_USAGE
    from edgekms.aio import run
    from edgekms.logs import setup_logging

    setup_logging("spiffe-agent", level)

    async def main_async() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(client_config, public, interval, stop)

    from edgekms.errors import KMSError

    try:
        run(main_async())
    except KMSError as exc:  # a missing or unreadable client config, a socket in use
        print(f"kmsctl: {exc.reason}: {exc.message}", file=sys.stderr)
        return EXIT_CODES.get(exc.code_name, 1)
    except OSError as exc:
        print(f"kmsctl: spiffe.socket_unusable: {exc}", file=sys.stderr)
        return EXIT_FAILED_PRECONDITION
    return 0


if __name__ == "__main__":
    sys.exit(main())
