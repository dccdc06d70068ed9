"""`kmsctl ca ...`: running and administering the mini-CA (see docs/ca.md)."""

from __future__ import annotations

import asyncio
import importlib
import signal
import sys
from pathlib import Path

import click

from edgekms.logs import setup_logging
from mgmt.cli.common import ExitCode

# The administration commands, in their own module (see there for why).
_ADMIN_MODULE = "mgmt.cli.ca_admin"


class _CaGroup(click.Group):
    """`serve` is here; the other commands are registered when first asked for."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            importlib.import_module(_ADMIN_MODULE)
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        importlib.import_module(_ADMIN_MODULE)
        return super().list_commands(ctx)


@click.group(cls=_CaGroup)
def ca() -> None:
    """The mini-CA: VPN and HTTPS certificates whose CA keys live in the KMS."""


@ca.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="EDGEKMS_CA_CONFIG",
    required=True,
    help="CA service config (TOML); `kmsctl up` writes one under DATA_DIR/config.",
)
@click.option("--log-level", default="info", show_default=True)
def serve(config_path: Path, log_level: str) -> None:
    """Run the CA service: kms.ca.* on NATS (exposed by the broker as gRPC
    CertificateAuthority) and HTTP for relying parties: /crl, /ocsp, /ca.crt, /chain.pem.
    Runs until SIGTERM or SIGINT."""
    # nats-py imports aiohttp (its WebSocket transport) whenever it is installed: ~13 MB
    # resident this service never uses (the bus is tcp/tls; mgmt.ca.http is asyncio).
    # Blocked before this process first imports nats, as kms-crypto and kms-broker do.
    sys.modules.setdefault("aiohttp", None)  # type: ignore[arg-type]
    from mgmt.ca.config import CAConfigError, load_serve_config
    from mgmt.ca.service import serve as serve_ca

    setup_logging("ca", log_level)
    try:
        config = load_serve_config(config_path)
    except CAConfigError as exc:
        click.echo(f"kmsctl: {exc}", err=True)
        sys.exit(ExitCode.USAGE)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_ca(config, stop)

    from edgekms import aio

    try:
        aio.run(run())
    except OSError as exc:
        click.echo(f"kmsctl: ca serve: {exc}", err=True)
        sys.exit(ExitCode.UNAVAILABLE)


def register(cli: click.Group) -> None:
    cli.add_command(ca)
