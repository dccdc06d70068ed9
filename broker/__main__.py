"""`kms-broker --config FILE`: run the broker until SIGTERM or SIGINT.

Exit codes: 0 stopped cleanly, 2 bad config, 4 the bus or the listen address is
unavailable.
"""

from __future__ import annotations

import sys

# nats-py imports aiohttp (its WebSocket transport) whenever it is installed: ~10 MB of
# resident memory the broker never uses (it dials tls://; the CA's HTTP side runs in its
# own process). Blocked here, before the first `import nats`, never in the library.
sys.modules.setdefault("aiohttp", None)  # type: ignore[arg-type]

from pathlib import Path  # noqa: E402

import click  # noqa: E402

from broker.config import ConfigError, load_config  # noqa: E402
from broker.server import serve  # noqa: E402
from edgekms import aio  # noqa: E402
from edgekms.errors import KMSError  # noqa: E402
from edgekms.logs import setup_logging  # noqa: E402


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="EDGEKMS_BROKER_CONFIG",
    required=True,
    help="Broker config (TOML); `kmsctl init` writes one.",
)
@click.option("--log-level", default="info", show_default=True)
def main(config_path: Path, log_level: str) -> None:
    """The EdgeKMS broker: gRPC with mutual TLS in front, NATS behind."""
    setup_logging("broker", log_level)
    try:
        config = load_config(config_path)
        for path in (config.tls.cert, config.tls.key, config.tls.client_ca):
            if not path.exists():
                raise ConfigError(f"{config_path}: {path} does not exist (run `kmsctl init`)")
    except ConfigError as exc:
        click.echo(f"kms-broker: {exc}", err=True)
        sys.exit(2)
    try:
        aio.run(serve(config))
    except KMSError as exc:
        click.echo(f"kms-broker: {exc}", err=True)
        sys.exit(4)


if __name__ == "__main__":
    main()
