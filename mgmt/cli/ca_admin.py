"""`kmsctl ca init|certs|crl|profiles`: administering the mini-CA through the broker.

Apart from mgmt.cli.ca so that `kmsctl ca serve`, the CA service itself, does not load
the gRPC client, cryptography.x509 and the CLI helpers these commands need; the `ca`
group imports this module when one of them is asked for.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from edgekms.durations import format_ttl
from edgekms.v1 import ca_pb2
from mgmt.cli.ca import ca
from mgmt.cli.client_access import client_options, open_client, write_output
from mgmt.cli.common import output_option
from mgmt.cli.output import echo_json, openssl_serial, progress, table
from mgmt.client import CREATE_TIMEOUT


def _pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def _write_ca_files(
    out_dir: Path, root_der: bytes, intermediate_der: bytes, retired: Sequence[bytes] = ()
) -> list[Path]:
    """root.crt, intermediate.crt and chain.pem (issuing CA, then the retired
    intermediates whose certificates are still in force, then root: OpenVPN's `ca`,
    strongSwan's cacerts, a browser's trust import)."""
    from mgmt.pki import write_public

    files = {
        "root.crt": _pem(root_der),
        "intermediate.crt": _pem(intermediate_der),
        "chain.pem": b"".join(_pem(d) for d in [intermediate_der, *retired, root_der]),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        write_public(out_dir / name, data)
    return [out_dir / name for name in files]


def name_constraint_options(f: Callable[..., None]) -> Callable[..., None]:
    """--permit-dns/--permit-ip/--exclude-dns/--exclude-ip, for `ca init` and `ca rotate`."""
    options = [
        ("--permit-dns", "DOMAIN", "Leaves may carry only names in DOMAIN (and under it)."),
        ("--permit-ip", "CIDR", "Leaves may carry only IP addresses in CIDR."),
        ("--exclude-dns", "DOMAIN", "Leaves may never carry names in DOMAIN."),
        ("--exclude-ip", "CIDR", "Leaves may never carry IP addresses in CIDR."),
    ]
    for flag, metavar, text in reversed(options):
        f = click.option(flag, multiple=True, metavar=metavar, help=text + " Repeatable.")(f)
    return f


def constraints_dict(intermediate_der: bytes) -> dict[str, list[str]]:
    """The intermediate's name constraints, as `-o json` shows them."""
    from edgekms import nameconstraints as constraints

    spec = constraints.to_spec(
        constraints.of_certificate(x509.load_der_x509_certificate(intermediate_der))
    )
    return {
        "permitted_dns": list(spec.permitted_dns),
        "permitted_ip": list(spec.permitted_ip),
        "excluded_dns": list(spec.excluded_dns),
        "excluded_ip": list(spec.excluded_ip),
    }


def _key_id(der: bytes) -> str:
    cert = x509.load_der_x509_certificate(der)
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return ski.digest.hex().upper()


def _cert_summary(der: bytes) -> dict[str, str]:
    cert = x509.load_der_x509_certificate(der)
    return {
        "subject": cert.subject.rfc4514_string(),
        "serial": openssl_serial(cert.serial_number),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(":").upper(),
    }


@ca.command("init")
@click.option(
    "--provider",
    default="hsm0",
    show_default=True,
    help="Where the CA keys are made: hsm0 (the token) or tpm0 (the TPM).",
)
@click.option(
    "--key-type",
    default="ec-p256",
    show_default=True,
    help="ec-p256, ec-p384, rsa-2048, rsa-3072, rsa-4096 (both CA keys).",
)
@click.option("--name", "common_name", default="EdgeKMS CA", show_default=True, help="Root CN.")
@click.option("--org", "organization", default="", help="Organization (O) of both CA names.")
@click.option("--root-days", type=click.IntRange(min=0), default=0, help="0: 7300.")
@click.option("--intermediate-days", type=click.IntRange(min=0), default=0, help="0: 1825.")
@click.option(
    "--disable-root",
    is_flag=True,
    help="Disable ca/root in the key registry once the intermediate exists "
    "(`kmsctl key enable ca/root` for the next intermediate).",
)
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write root.crt, intermediate.crt and chain.pem here.",
)
@name_constraint_options
@output_option
@client_options
def init_cmd(
    provider: str,
    key_type: str,
    common_name: str,
    organization: str,
    root_days: int,
    intermediate_days: int,
    disable_root: bool,
    out_dir: Path | None,
    permit_dns: tuple[str, ...],
    permit_ip: tuple[str, ...],
    exclude_dns: tuple[str, ...],
    exclude_ip: tuple[str, ...],
    output: str,
    data_dir: Path,
    config_path: Path | None,
) -> None:
    """Create the CA: a root and an intermediate whose keys are generated in PROVIDER
    through the KMS (registered as ca/root and ca/intermediate), the root self-signed, the
    intermediate signed by it. Refused (exit 5) when the CA exists.

    \b
    Limit what it may certify (critical name constraints on the intermediate):
      kmsctl ca init --name "Home CA" --permit-dns home.arpa --permit-ip 192.168.0.0/16
    """
    nc = ca_pb2.NameConstraints(
        permitted_dns=permit_dns,
        permitted_ip=permit_ip,
        excluded_dns=exclude_dns,
        excluded_ip=exclude_ip,
    )
    with (
        open_client(data_dir, config_path, timeout=CREATE_TIMEOUT) as kms,
        progress(f"making the CA keys in {provider}"),
    ):
        response = kms.ca_init(
            common_name,
            key_type,
            provider=provider,
            organization=organization,
            root_validity_days=root_days,
            intermediate_validity_days=intermediate_days,
            disable_root=disable_root,
            name_constraints=nc,
        )
    files = (
        _write_ca_files(
            out_dir, response.root_certificate_der, response.intermediate_certificate_der
        )
        if out_dir is not None
        else []
    )
    root = _cert_summary(response.root_certificate_der)
    intermediate = _cert_summary(response.intermediate_certificate_der)
    if output == "json":
        echo_json(
            {
                "provider": provider,
                "root": root,
                "intermediate": intermediate,
                "root_disabled": disable_root,
                "name_constraints": constraints_dict(response.intermediate_certificate_der),
                "files": [str(f) for f in files],
            }
        )
        return
    click.echo(f"root:         {root['subject']}  sha256 {root['sha256']}")
    click.echo(f"intermediate: {intermediate['subject']}  until {intermediate['not_after']}")
    for kind, values in constraints_dict(response.intermediate_certificate_der).items():
        if values:
            click.echo(f"{kind + ':':<14}{', '.join(values)}")
    if disable_root:
        click.echo("ca/root is disabled in the key registry")
    for f in files:
        click.echo(f"wrote {f}")


@ca.command("certs")
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Writes root.crt, intermediate.crt and chain.pem (PEM). Needed unless -o json.",
)
@output_option
@client_options
def certs_cmd(out_dir: Path | None, output: str, data_dir: Path, config_path: Path | None) -> None:
    """The CA certificates, for the relying parties' trust stores."""
    if out_dir is None and output != "json":
        raise click.UsageError("give --out-dir (or -o json for the certificates' details)")
    with open_client(data_dir, config_path) as kms:
        response = kms.get_ca_certificates()
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
    if output == "json":
        echo_json(
            {
                "root": _cert_summary(response.root_certificate_der),
                "intermediate": _cert_summary(response.intermediate_certificate_der),
                "retired_intermediates": [
                    _cert_summary(der) for der in response.retired_intermediates_der
                ],
                "files": [str(f) for f in files],
            }
        )
        return
    for f in files:
        click.echo(f"wrote {f}")


@ca.command("crl")
@click.option("--out", default=None, help="Where to write the CRL ('-' for stdout).")
@click.option("--pem", is_flag=True, help="PEM instead of DER (OpenVPN's crl-verify wants PEM).")
@click.option(
    "--root",
    "root_crl",
    is_flag=True,
    help="The root's CRL (revoked intermediates) instead: with the intermediate's, what "
    "`openssl verify -crl_check_all` needs.",
)
@output_option
@client_options
def crl_cmd(
    out: str | None,
    pem: bool,
    root_crl: bool,
    output: str,
    data_dir: Path,
    config_path: Path | None,
) -> None:
    """The current CRL, signed by the intermediate, or with --root the root's own
    (long-lived; re-signed when the root key is used). A revocation reaches the
    intermediate's CRL within moments (the CA builds it in the background). After a
    rotation, --pem also holds each retired intermediate's CRL (one per issuing CA, as
    OpenVPN's crl-verify needs them). -o json describes the CRL: number, dates, how many
    entries, its SHA-256."""
    if out is None and output != "json":
        raise click.UsageError("give --out (or -o json for the CRL's details)")
    if out == "-" and output == "json":
        raise click.UsageError("-o json prints to stdout: write the CRL to a file with --out")
    with open_client(data_dir, config_path) as kms:
        response = kms.get_root_crl() if root_crl else kms.get_crl()
        # After a rotation the retired intermediates' CRLs go along (PEM holds several):
        # OpenVPN's crl-verify and openssl -CRLfile need one per intermediate in force.
        retired = (
            [
                kms.get_issuer_crl(_key_id(der)).crl_der
                for der in kms.get_ca_certificates().retired_intermediates_der
            ]
            if pem and not root_crl
            else []
        )
    data = response.crl_der
    crl = x509.load_der_x509_crl(data)
    if pem:
        data = b"".join(
            x509.load_der_x509_crl(d).public_bytes(serialization.Encoding.PEM)
            for d in [data, *retired]
        )
    if out is not None:
        write_output(out, data)
    if output == "json":
        echo_json(
            {
                "crl_number": response.crl_number,
                "this_update": crl.last_update_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "next_update": response.next_update,
                "issuer": crl.issuer.rfc4514_string(),
                "revoked": len(crl),
                "size": len(response.crl_der),
                "sha256": hashlib.sha256(response.crl_der).hexdigest(),
                "out": out or "",
            }
        )
    elif out != "-":
        click.echo(f"CRL {response.crl_number}, next update {response.next_update}", err=True)


@ca.command("prune")
@click.option(
    "--older-than",
    "older_than",
    required=True,
    help="Retention: remove records of certificates expired longer ago than this (90d, 12w).",
)
@click.option("--dry-run", is_flag=True, help="Only say what would go.")
@output_option
@client_options
def prune_cmd(
    older_than: str, dry_run: bool, output: str, data_dir: Path, config_path: Path | None
) -> None:
    """Remove the CA's records of long-expired certificates (renewals pile them up).

    Only certificates past their notAfter for longer than --older-than go, revoked or
    not: an expired certificate fails verification on its dates, so no CRL needs its
    entry. A revoked certificate that has not expired stays, however old. Administrators
    only.
    """
    from mgmt.cli.certs import parse_days

    days = parse_days(older_than)
    with open_client(data_dir, config_path) as kms:
        response = kms.prune_certificates(days, dry_run=dry_run)
    serials = [openssl_serial(s) for s in response.serials]
    if output == "json":
        echo_json(
            {
                "pruned": response.pruned,
                "dry_run": dry_run,
                "serials": serials,
                "crl_number": response.crl_number,
            }
        )
        return
    verb = "would prune" if dry_run else "pruned"
    click.echo(f"{verb} {response.pruned} record(s) expired before {days} day(s) ago")
    for serial in serials:
        click.echo(f"  {serial}")
    if response.pruned > len(serials):
        click.echo(f"  ... and {response.pruned - len(serials)} more")


@ca.command("profiles")
@output_option
@client_options
def profiles_cmd(output: str, data_dir: Path, config_path: Path | None) -> None:
    """The profiles the CA issues under."""
    with open_client(data_dir, config_path) as kms:
        profiles = kms.list_profiles()
    if output == "json":
        echo_json(
            [
                {
                    "name": p.name,
                    "description": p.description,
                    "max_validity_days": p.max_validity_days,
                    "max_ttl": format_ttl(datetime.timedelta(seconds=p.max_validity_seconds)),
                    "default_ttl": format_ttl(
                        datetime.timedelta(seconds=p.default_validity_seconds)
                    ),
                    "key_types": list(p.key_types),
                    "extended_key_usages": list(p.extended_key_usages),
                }
                for p in profiles
            ]
        )
        return
    rows = [
        [
            p.name,
            format_ttl(datetime.timedelta(seconds=p.default_validity_seconds)),
            format_ttl(datetime.timedelta(seconds=p.max_validity_seconds)),
            ",".join(p.extended_key_usages),
            p.description,
        ]
        for p in profiles
    ]
    click.echo(table(["PROFILE", "DEFAULT", "MAX", "EKU", "DESCRIPTION"], rows))


# `ca rotate` and `ca revoke-intermediate` live in their own module; importing it
# registers them on the `ca` group.
from mgmt.cli import ca_hierarchy  # noqa: E402, F401
