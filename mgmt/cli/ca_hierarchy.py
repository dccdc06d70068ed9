"""`kmsctl ca rotate` and `kmsctl ca revoke-intermediate`: replacing the CA's issuing
intermediate, the two operations that need the root key (enable ca/root first when the
CA was made with --disable-root). See docs/ca.md "Rotation and revocation"."""

from __future__ import annotations

from pathlib import Path

import click
from cryptography import x509

from edgekms.v1 import ca_pb2
from mgmt.cli.ca import ca
from mgmt.cli.ca_admin import (
    _cert_summary,
    _write_ca_files,
    constraints_dict,
    name_constraint_options,
)
from mgmt.cli.certs import REASONS
from mgmt.cli.client_access import client_options, open_client
from mgmt.cli.common import output_option
from mgmt.cli.output import echo_json, progress
from mgmt.client import CREATE_TIMEOUT


@ca.command("rotate")
@click.option(
    "--intermediate-days", type=click.IntRange(min=0), default=0, help="0: 1825 (5 years)."
)
@name_constraint_options
@click.option(
    "--clear-name-constraints",
    is_flag=True,
    help="The new intermediate has none (by default the current ones carry over).",
)
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write root.crt, intermediate.crt and chain.pem (with the old intermediate) here.",
)
@output_option
@client_options
def rotate_cmd(
    intermediate_days: int,
    permit_dns: tuple[str, ...],
    permit_ip: tuple[str, ...],
    exclude_dns: tuple[str, ...],
    exclude_ip: tuple[str, ...],
    clear_name_constraints: bool,
    out_dir: Path | None,
    output: str,
    data_dir: Path,
    config_path: Path | None,
) -> None:
    """Make the next intermediate: a new key in the CA's provider (registered as
    ca/intermediate-<n>), certified by the root. Leaves come from it from now on; the old
    intermediate keeps signing its CRL and OCSP answers until the last certificate it
    issued expires, so hand relying parties the new chain.pem (it carries both).

    \b
    kmsctl key enable ca/root          # if the CA was made with --disable-root
    kmsctl ca rotate --out-dir ca
    kmsctl key disable ca/root
    """
    nc = ca_pb2.NameConstraints(
        permitted_dns=permit_dns,
        permitted_ip=permit_ip,
        excluded_dns=exclude_dns,
        excluded_ip=exclude_ip,
    )
    with (
        open_client(data_dir, config_path, timeout=CREATE_TIMEOUT) as kms,
        progress("making the new intermediate key"),
    ):
        response = kms.rotate_ca(
            intermediate_days, name_constraints=nc, clear_name_constraints=clear_name_constraints
        )
    files = (
        _write_ca_files(
            out_dir,
            response.root_certificate_der,
            response.intermediate_certificate_der,
            response.retired_intermediates_der,
        )
        if out_dir is not None
        else []
    )
    summary = _cert_summary(response.intermediate_certificate_der)
    if output == "json":
        echo_json(
            {
                "intermediate": summary,
                "retired": [_cert_summary(d) for d in response.retired_intermediates_der],
                "name_constraints": constraints_dict(response.intermediate_certificate_der),
                "files": [str(f) for f in files],
            }
        )
        return
    click.echo(f"intermediate: {summary['subject']}  until {summary['not_after']}")
    for der in response.retired_intermediates_der:
        old = _cert_summary(der)
        click.echo(f"retired:      {old['subject']}  (signs its CRL and OCSP until its leaves end)")
    for f in files:
        click.echo(f"wrote {f}")


@ca.command("revoke-intermediate")
@click.argument("serial", required=False)
@click.option(
    "--reason",
    type=click.Choice(list(REASONS)),
    default="unspecified",
    show_default=True,
    help="key-compromise or ca-compromise when the key leaked; superseded after a rotation.",
)
@click.option("--yes", is_flag=True, help="Do it: nothing more is issued until `ca rotate`.")
@output_option
@client_options
def revoke_intermediate_cmd(
    serial: str | None,
    reason: str,
    yes: bool,
    output: str,
    data_dir: Path,
    config_path: Path | None,
) -> None:
    """Revoke an intermediate (SERIAL; the current one when left out) with the root: it
    goes onto the root CRL (`kmsctl ca crl --root`, /root.crl) and OCSP answers
    "revoked" for it, so every leaf under it fails strict verification. Revoking the
    current one stops issuance until `kmsctl ca rotate`. Needs ca/root enabled."""
    if not yes:
        raise click.UsageError("revoking an intermediate cannot be undone: add --yes")
    with open_client(data_dir, config_path) as kms:
        if serial is None:
            current = kms.get_ca_certificates().intermediate_certificate_der
            serial = f"{x509.load_der_x509_certificate(current).serial_number:X}"
        response = kms.revoke_intermediate(serial.replace(":", "").upper(), REASONS[reason])
    if output == "json":
        echo_json(
            {
                "serial": response.serial,
                "reason": reason,
                "root_crl_number": response.root_crl_number,
            }
        )
    else:
        click.echo(
            f"revoked intermediate {response.serial} ({reason}); root CRL "
            f"{response.root_crl_number}"
        )
