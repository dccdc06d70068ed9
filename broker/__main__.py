"""`kms-broker --config FILE`: run the broker until SIGTERM or SIGINT.

Exit codes: 0 stopped cleanly, 2 bad config, 4 the bus or the listen address is
unavailable.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from broker.config import ConfigError, load_config
from broker.server import serve
from edgekms.errors import KMSError
from edgekms.logs import setup_logging


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
        asyncio.run(serve(config))
    except KMSError as exc:
        click.echo(f"kms-broker: {exc}", err=True)
        sys.exit(4)


if __name__ == "__main__":
    main()
