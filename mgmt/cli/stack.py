"""`kmsctl up`, `kmsctl init` and `kmsctl status`: running the system and checking it."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from edgekms.errors import FailedPrecondition, KMSError
from edgekms.logs import setup_logging
from mgmt.cli.client_access import client_options, open_client
from mgmt.cli.common import ExitCode, client_config_path, data_dir_option, output_option
from mgmt.cli.output import echo_json, handle_errors, table


@click.command()
@data_dir_option
@click.option("--nats-port", default=4222, show_default=True, help="Loopback port for NATS.")
@click.option(
    "--broker-listen",
    default="127.0.0.1:8443",
    show_default=True,
    help="Where the broker listens (host:port). Use 0.0.0.0:8443 to serve the LAN.",
)
@click.option(
    "--tpm",
    default=None,
    metavar="swtpm|DEVICE|TCTI",
    help="Also run crypto service tpm0: `swtpm` starts a software TPM for development; "
    "on a board give the device (/dev/tpmrm0) or a TCTI string.",
)
@click.option(
    "--swtpm-port",
    type=int,
    default=None,
    hidden=True,
    help="Ignored: swtpm now listens on private Unix sockets (kept so old scripts run).",
)
@click.option(
    "--ca-http",
    default="127.0.0.1:8180",
    show_default=True,
    help="Where the CA serves its CRL, OCSP and CA certificates (host:port).",
)
@click.option(
    "--ca-base-url",
    default="",
    help="Base URL relying parties reach the CA at (e.g. http://nas.lan:8180); written "
    "into certificates as CRL distribution point and AIA. Empty: left out.",
)
@click.option(
    "--ca-provider",
    default="",
    help="The provider holding the mini-CA's keys (hsm0, or tpm0 with --tpm); the CA "
    "service may reach only this one. Default: hsm0.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    help="Of `kmsctl up` and of every service it starts.",
)
@click.option(
    "--start-timeout",
    type=click.FloatRange(min=1.0),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="How long each service may take to become ready before kmsctl up gives up. "
    "Raise it on a slow board or under emulation (qemu-user: 20x).",
)
def up(
    data_dir: Path,
    nats_port: int,
    broker_listen: str,
    tpm: str | None,
    swtpm_port: int | None,
    ca_http: str,
    ca_base_url: str,
    ca_provider: str,
    log_level: str,
    start_timeout: float,
) -> None:
    """Run the embedded EdgeKMS in the foreground until Ctrl-C.

    \b
    Starts, each as its own process with a log under DATA_DIR/logs:
      nats-server     JetStream on a file store (DATA_DIR/nats); 2.10 or later
      SoftHSM token   created on first run (DATA_DIR/softhsm/softhsm2.conf)
      kms-crypto      provider hsm0, in front of the token
      kms-crypto      provider tpm0 in front of a TPM, with --tpm (swtpm or a device);
                      swtpm on 0600 Unix sockets, provisioned (`kmsctl tpm provision`)
      kmsctl ca serve the mini-CA on NATS, and HTTP for CRL/OCSP on --ca-http
      kms-broker      gRPC with mutual TLS on --broker-listen
    The first start runs the bootstrap ceremony (`kmsctl init`): an internal CA whose
    key is generated inside the token, the broker's certificate and an admin client
    certificate, with a client config that every later command uses.

    \b
    Example:
      kmsctl up --data-dir ./kms &
      kmsctl status --data-dir ./kms

    Exits 6 when the machine cannot run it as it is (a nats-server older than 2.10:
    `nats.server_too_old`), 8 when a part failed to start or died for good.
    """
    # nats-py imports aiohttp (its WebSocket transport) whenever it is installed: ~0.2 s
    # before nats-server can start, and ~10 MB kept, for a supervisor that dials tls://.
    # Blocked in this process only, before its first `import nats` (as kms-broker and
    # kms-crypto do); the CA service, which serves HTTP with aiohttp, is its own process.
    sys.modules.setdefault("aiohttp", None)  # type: ignore[arg-type]
    from mgmt.stack import StackError, StackOptions, run_stack

    setup_logging("kmsctl-up", log_level)
    options = StackOptions(
        data_dir=data_dir,
        nats_port=nats_port,
        broker_listen=broker_listen,
        tpm=tpm,
        ca_http=ca_http,
        ca_base_url=ca_base_url,
        ca_provider=ca_provider,
        log_level=log_level.lower(),
        start_timeout=start_timeout,
    )
    if swtpm_port is not None:
        click.echo(
            "kmsctl up: --swtpm-port is ignored: swtpm listens on Unix sockets only this user"
            " may open (DATA_DIR/swtpm/swtpm.sock)",
            err=True,
        )
    if ca_provider and ca_provider not in options.providers:
        raise click.UsageError(f"--ca-provider {ca_provider}: no such provider in this stack")

    def ready(stack: object) -> None:
        click.echo(
            f"EdgeKMS is up: broker {broker_listen}, NATS 127.0.0.1:{nats_port}, "
            f"data in {data_dir}. Client config: {client_config_path(data_dir)}. Ctrl-C stops.",
            err=True,
        )

    try:
        asyncio.run(run_stack(options, ready))
    except StackError as exc:
        click.echo(f"kmsctl: {exc}", err=True)
        sys.exit(ExitCode.UNAVAILABLE)
    except FailedPrecondition as exc:
        # Waiting will not help (e.g. nats.server_too_old): the machine needs changing.
        click.echo(f"kmsctl: {exc}", err=True)
        sys.exit(ExitCode.FAILED_PRECONDITION)
    except KMSError as exc:
        click.echo(f"kmsctl: {exc}", err=True)
        sys.exit(ExitCode.UNAVAILABLE)
    click.echo("EdgeKMS stopped.", err=True)


@click.command()
@data_dir_option
@click.option("--nats-url", default="nats://127.0.0.1:4222", show_default=True)
@click.option("--provider", default="hsm0", show_default=True, help="Where the CA key is made.")
@click.option(
    "--broker-address",
    default="127.0.0.1:8443",
    show_default=True,
    help="host:port clients dial; written into the client config.",
)
@click.option(
    "--broker-name",
    "broker_names",
    multiple=True,
    default=("localhost", "127.0.0.1"),
    show_default=True,
    help="Extra DNS names / IPs for the broker's certificate (repeat).",
)
@click.option("--nats-user", envvar="EDGEKMS_NATS_USER", help="Bus identity (default: kmsctl's).")
@click.option(
    "--nats-password-file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="EDGEKMS_NATS_PASSWORD_FILE",
    help="File holding that identity's password (never pass it on the command line).",
)
@click.option(
    "--nats-ca",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="EDGEKMS_NATS_CA",
    help="CA certificate of the bus's TLS.",
)
@output_option
@handle_errors
def init(
    data_dir: Path,
    nats_url: str,
    provider: str,
    broker_address: str,
    broker_names: tuple[str, ...],
    nats_user: str | None,
    nats_password_file: Path | None,
    nats_ca: Path | None,
    output: str,
) -> None:
    """Run the bootstrap ceremony (once; later runs change nothing).

    Needs NATS and the crypto service PROVIDER running (`kmsctl up` runs this for you).
    On a bus with credentials, it uses --nats-user/--nats-password-file/--nats-ca, or
    else the `kmsctl` identity that `kmsctl up` made under DATA_DIR.
    The internal CA key is generated inside the token and never leaves it; the
    broker's certificate and the first admin's client certificate are issued from it,
    and DATA_DIR/client/config.toml is written for every later command.
    """
    from edgekms.sealed import WRITER_CEREMONY
    from mgmt.natsauth import BusCredentials, local_credentials
    from mgmt.pki import run_ceremony
    from mgmt.sealkeys import local_seal

    if nats_user or nats_password_file:
        credentials = BusCredentials(nats_user, nats_password_file, nats_ca)
    else:
        credentials = local_credentials(data_dir)
    result = asyncio.run(
        run_ceremony(
            nats_url,
            provider,
            data_dir / "pki",
            data_dir / "client",
            broker_address=broker_address,
            broker_names=list(broker_names),
            nats_options=credentials.connect_options(),
            # The ceremony's record-sealing key, if `kmsctl up` made the keys here.
            seal=local_seal(data_dir / "secrets", WRITER_CEREMONY),
        )
    )
    if output == "json":
        echo_json(
            {
                "created": result.created,
                "ca_cert": str(result.ca_cert),
                "client_config": str(result.client_config),
            }
        )
    elif result.created:
        click.echo(f"Internal CA ready: {result.ca_cert}\nClient config: {result.client_config}")
    else:
        click.echo(f"Already initialised: {result.client_config}")


@click.command()
@client_options
@output_option
def status(data_dir: Path, config_path: Path | None, output: str) -> None:
    """Is everything answering? Exit 0 only if the broker, the bus, every crypto
    service and the CA answer; 8 (unavailable) otherwise. A service that lost its bus
    connection does not answer (and exits, so that `kmsctl up` restarts it)."""
    with open_client(data_dir, config_path, timeout=5) as client:
        response = client.status()
    if output == "json":
        echo_json(
            {
                "ok": response.ok,
                "components": [
                    {"name": c.name, "ok": c.ok, "detail": c.detail} for c in response.components
                ],
            }
        )
    else:
        rows = [[c.name, "ok" if c.ok else "DOWN", c.detail] for c in response.components]
        click.echo(table(["component", "status", "detail"], rows))
    if not response.ok:
        sys.exit(ExitCode.UNAVAILABLE)


def register(cli: click.Group) -> None:
    cli.add_command(up)
    cli.add_command(init)
    cli.add_command(status)
