"""`kmsctl tpm provision`: take ownership of a TPM (hierarchy auth, DA parameters)."""

from __future__ import annotations

from pathlib import Path

import click

from mgmt.cli.common import data_dir_option, output_option
from mgmt.cli.output import echo_json, handle_errors


@click.group("tpm")
def tpm_group() -> None:
    """The TPM behind crypto service tpm0."""


def tcti_of(tpm: str) -> str:
    """A device path becomes the device TCTI; anything else is taken as a TCTI string."""
    return f"device:{tpm}" if tpm.startswith("/dev/") else tpm


@tpm_group.command("provision")
@click.option(
    "--tpm",
    required=True,
    metavar="DEVICE|TCTI",
    help="The TPM: a device (/dev/tpmrm0) or a TCTI string (swtpm:path=DIR/swtpm.sock).",
)
@click.option(
    "--max-tries",
    type=click.IntRange(1, 1000),
    default=10,
    show_default=True,
    help="Wrong auth values the TPM takes before it locks DA-protected keys out.",
)
@click.option(
    "--recovery-time",
    type=click.IntRange(1, 2**32 - 1),
    default=600,
    show_default=True,
    help="Seconds after which the TPM forgives one failure.",
)
@click.option(
    "--lockout-recovery",
    type=click.IntRange(0, 2**32 - 1),
    default=86400,
    show_default=True,
    help="Seconds the lockout hierarchy stays locked after a wrong lockout auth "
    "(0: until the next TPM reset).",
)
@output_option
@data_dir_option
@handle_errors
def provision_cmd(
    tpm: str,
    max_tries: int,
    recovery_time: int,
    lockout_recovery: int,
    output: str,
    data_dir: Path,
) -> None:
    """Set random owner, endorsement and lockout auth and the dictionary-attack limits.

    A TPM nobody provisioned has empty hierarchy auth: any process that can reach it may
    clear its lockout or erase every key with TPM2_Clear. The values are written to
    DATA_DIR/secrets/tpm-{owner,endorsement,lockout}.auth (0600) before the TPM gets
    them; run it again and it keeps them and re-applies the limits. `kmsctl up --tpm`
    passes the owner and endorsement files to crypto service tpm0 (restart it after
    provisioning a real TPM); keep the lockout file for the day you need

    \b
      tpm2_dictionarylockout --clear-lockout -p file:DATA_DIR/secrets/tpm-lockout.auth

    `kmsctl up --tpm swtpm` provisions its own swtpm on first start; swtpm takes one
    client at a time, so run this against swtpm only while the stack is stopped.
    Exit 6 (tpm.owned_elsewhere) when the TPM already has auth values that are not in
    DATA_DIR/secrets.
    """
    from mgmt.tpm_provision import DaParameters, provision

    result = provision(
        tcti_of(tpm),
        data_dir / "secrets",
        DaParameters(max_tries, recovery_time, lockout_recovery),
    )
    if output == "json":
        echo_json(result.to_dict())
        return
    for name, state in result.auth.items():
        click.echo(f"{name} auth: {'set now' if state == 'set' else 'already set, kept'}")
    click.echo(
        f"dictionary attack: {max_tries} tries, one forgiven every {recovery_time} s, "
        f"lockout recovery {lockout_recovery} s"
    )


def register(cli: click.Group) -> None:
    cli.add_command(tpm_group)
