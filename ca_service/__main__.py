"""The process that runs the CA service: `kmsctl ca serve` execs `python -m ca_service`.

The CA's resident-memory target is 45 MB (docs/performance.md), and kmsctl's CLI (click
and its group modules) alone costs ~4 MB that a running service never uses again. So
`kmsctl ca serve` parses its options with click and then replaces itself (exec: same pid,
so `kmsctl up`, systemd and signals see one process) with this interpreter, which loads
only the service. Its arguments are exactly the ones kmsctl passes; the config is
checked here, so a bad one fails with the same message and exit code as before.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

# Exit codes as mgmt.cli.common.ExitCode numbers them (not imported: it imports click);
# tests/ca/test_entry.py holds them equal.
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 8

USAGE = "usage: python -m ca_service --config PATH [--log-level LEVEL]"


def parse_args(argv: Sequence[str]) -> tuple[str, str]:
    """(config path, log level) from `--config PATH [--log-level LEVEL]`; ValueError else.

    By hand rather than argparse (~0.4 MB): the only caller is `kmsctl ca serve`."""
    options = {"--config": "", "--log-level": "info"}
    rest = list(argv)
    while rest:
        name = rest.pop(0)
        if name not in options or not rest:
            raise ValueError(f"unexpected argument {name!r}")
        options[name] = rest.pop(0)
    if not options["--config"]:
        raise ValueError("--config is required")
    return options["--config"], options["--log-level"]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config_arg, log_level = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"kmsctl: ca serve: {exc}\n{USAGE}", file=sys.stderr)
        return EXIT_USAGE
    from edgekms.leannats import import_nats_lean

    import_nats_lean()  # ca_service.http is asyncio: no aiohttp either

    import asyncio
    import signal
    from pathlib import Path

    from ca_service.config import CAConfigError, load_serve_config
    from ca_service.service import serve
    from edgekms.errors import KMSError
    from edgekms.logs import setup_logging

    setup_logging("ca", log_level)
    try:
        config = load_serve_config(Path(config_arg))
    except CAConfigError as exc:
        print(f"kmsctl: {exc}", file=sys.stderr)
        return EXIT_USAGE

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, stop)

    # The standard loop, not uvloop (edgekms.aio): issuance waits on token signatures,
    # not on the loop; uvloop measured no difference in issuance rate or CA CPU per
    # certificate, and cost ~1.8 MB resident here (its module and libuv's threads).
    try:
        asyncio.run(run())
    except OSError as exc:
        print(f"kmsctl: ca serve: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KMSError as exc:  # the bus went away for good: exit so the supervisor restarts
        print(f"kmsctl: ca serve: {exc.reason}: {exc.message}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return 0


if __name__ == "__main__":
    sys.exit(main())
