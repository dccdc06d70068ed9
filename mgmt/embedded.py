"""`python -m mgmt.embedded`: the broker and the CA service in one process, for a small board.

`kmsctl up --embedded` runs this instead of `kms-broker` and `kmsctl ca serve`: one
interpreter, one copy of nats-py, protobuf and the event loop instead of two, which is
what a 512 MB board needs (docs/performance.md, "Memory"). Each service keeps its own bus
identity: the broker connects with the broker's credentials and the CA service with the
CA's, two NATS connections, each authorised by nats-server exactly as before. What is
given up is the process boundary between them: whoever takes over this process holds
both identities (docs/security.md, "Embedded mode"). The crypto services, which hold the
tokens, are never hosted here; `kmsctl up` keeps them in processes of their own.

Exit codes as kms-broker's: 0 stopped cleanly, 2 a bad config, 4 the bus or a listen
address unavailable (the supervisor then restarts the process).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 4

USAGE = "usage: python -m mgmt.embedded --broker-config PATH --ca-config PATH [--log-level LEVEL]"


def parse_args(argv: Sequence[str]) -> dict[str, str]:
    """The options `kmsctl up --embedded` passes, by hand (argparse and click cost resident
    memory a service never uses again); ValueError on anything else."""
    options = {"--broker-config": "", "--ca-config": "", "--log-level": "info"}
    rest = list(argv)
    while rest:
        name = rest.pop(0)
        if name not in options or not rest:
            raise ValueError(f"unexpected argument {name!r}")
        options[name] = rest.pop(0)
    for required in ("--broker-config", "--ca-config"):
        if not options[required]:
            raise ValueError(f"{required} is required")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    try:
        options = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"kms-embedded: {exc}\n{USAGE}", file=sys.stderr)
        return EXIT_USAGE
    from edgekms.leannats import import_nats_lean

    import_nats_lean()

    import asyncio
    import signal
    from pathlib import Path

    from broker.config import ConfigError, load_config
    from broker.server import serve as serve_broker
    from ca_service.config import CAConfigError, load_serve_config
    from ca_service.service import serve as serve_ca
    from edgekms import aio
    from edgekms.errors import KMSError
    from edgekms.logs import setup_logging

    setup_logging("broker+ca", options["--log-level"])
    try:
        broker_config = load_config(Path(options["--broker-config"]))
        for path in (broker_config.tls.cert, broker_config.tls.key, broker_config.tls.client_ca):
            if not path.exists():
                raise ConfigError(f"{path} does not exist (run `kmsctl init`)")
        ca_config = load_serve_config(Path(options["--ca-config"]))
    except (ConfigError, CAConfigError) as exc:
        print(f"kms-embedded: {exc}", file=sys.stderr)
        return EXIT_USAGE

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        # The CA first: the broker forwards issuance to it over the bus. Either service
        # ending (its bus lost for good, a port taken) stops the other, and the process
        # exits so that the supervisor starts both again: never half a stack.
        services = [
            asyncio.create_task(serve_ca(ca_config, stop), name="ca"),
            asyncio.create_task(serve_broker(broker_config, stop), name="broker"),
        ]
        await asyncio.wait(services, return_when=asyncio.FIRST_COMPLETED)
        stop.set()
        results = await asyncio.gather(*services, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    try:
        aio.run(run())
    except (OSError, KMSError) as exc:
        print(f"kms-embedded: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return 0


if __name__ == "__main__":
    sys.exit(main())
