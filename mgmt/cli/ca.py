"""`kmsctl ca ...`: running and administering the mini-CA (see docs/ca.md)."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import click

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
    # The service runs in a fresh interpreter without the CLI (ca_service.__main__ says
    # why); exec keeps this pid, so whoever started `kmsctl ca serve` supervises it.
    argv = [sys.executable, "-m", "ca_service", "--config", str(config_path)]
    argv += ["--log-level", log_level]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, argv)
    except OSError as exc:
        click.echo(f"kmsctl: ca serve: cannot start {sys.executable}: {exc}", err=True)
        sys.exit(ExitCode.UNAVAILABLE)


def register(cli: click.Group) -> None:
    cli.add_command(ca)
