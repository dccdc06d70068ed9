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


@tpm_group.command("ek")
@click.option(
    "--tpm",
    required=True,
    metavar="DEVICE|TCTI",
    help="The device's TPM: /dev/tpmrm0 or a TCTI string (swtpm:path=DIR/swtpm.sock).",
)
@click.option(
    "--endorsement-auth-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="The endorsement hierarchy's auth value, if the TPM was provisioned.",
)
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the EK's public key (PEM) here, for `enroll token create --ek`.",
)
@output_option
@handle_errors
def ek_cmd(
    tpm: str, endorsement_auth_file: Path | None, out_path: Path | None, output: str
) -> None:
    """Show this TPM's endorsement key: its identity (SHA-256 of the EK's public key,
    what the device registry records) and whether it carries a manufacturer certificate.

    \b
    On the device, to pre-register a TPM without an EK certificate:
      kmsctl tpm ek --tpm /dev/tpmrm0 --out ek.pem
    then on the administrator's machine:
      kmsctl enroll token create router-1 --ek ek.pem
    """
    from cryptography.hazmat.primitives import serialization

    from edgekms import tpmcred
    from mgmt.pki import write_public
    from mgmt.tpmdevice import DeviceTpm

    auth = endorsement_auth_file.read_bytes().rstrip(b"\n") if endorsement_auth_file else b""
    with DeviceTpm(tcti_of(tpm), auth) as device:
        evidence = device.evidence()
    ek = tpmcred.parse_public(evidence.ek_public)
    identity = tpmcred.ek_identity(ek.public_key_der).hex()
    pem = ek.key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if out_path is not None:
        write_public(out_path, pem)
    if output == "json":
        echo_json(
            {
                "ek_sha256": identity,
                "ek_certificate": bool(evidence.ek_certificate_der),
                "public_key_pem": pem.decode(),
            }
        )
        return
    click.echo(f"ek_sha256:      {identity}")
    click.echo(f"ek certificate: {'yes' if evidence.ek_certificate_der else 'none'}")
