"""`kmsctl cert ...`: certificates from the mini-CA, through the broker.

The CA only ever sees a CSR. With `--generate` the leaf key is made here, on the
administrator's machine (mgmt.bundle), and leaves only as the file written for its
user: a PEM key (0600) or a PKCS#12 bundle whose password comes from a file, never from
argv. Files are written after the CA answered, so a refusal leaves nothing behind.
"""

from __future__ import annotations

import base64
import datetime
import itertools
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from edgekms.errors import InvalidArgument
from edgekms.v1 import ca_pb2
from mgmt.cli.client_access import client_options, open_client, write_output
from mgmt.cli.common import output_option
from mgmt.cli.output import echo_json, openssl_serial, table

if TYPE_CHECKING:
    from mgmt.bundle import LeafKey

log = logging.getLogger(__name__)

REASONS: dict[str, ca_pb2.RevocationReason.ValueType] = {
    "unspecified": ca_pb2.REVOCATION_REASON_UNSPECIFIED,
    "key-compromise": ca_pb2.REVOCATION_REASON_KEY_COMPROMISE,
    "ca-compromise": ca_pb2.REVOCATION_REASON_CA_COMPROMISE,
    "affiliation-changed": ca_pb2.REVOCATION_REASON_AFFILIATION_CHANGED,
    "superseded": ca_pb2.REVOCATION_REASON_SUPERSEDED,
    "cessation-of-operation": ca_pb2.REVOCATION_REASON_CESSATION_OF_OPERATION,
    "certificate-hold": ca_pb2.REVOCATION_REASON_CERTIFICATE_HOLD,
    "privilege-withdrawn": ca_pb2.REVOCATION_REASON_PRIVILEGE_WITHDRAWN,
}
_REASON_NAMES = {v: k for k, v in REASONS.items()}
_DURATION_RE = re.compile(r"^(\d{1,5})([dw]?)$")
_SERIAL_RE = re.compile(r"^[0-9A-F]{1,40}$")


def parse_days(text: str) -> int:
    """ "30d", "4w" or "30" into days; anything else is InvalidArgument."""
    match = _DURATION_RE.match(text.strip().lower())
    if not match:
        raise InvalidArgument(
            "cert.duration_invalid", f"{text!r} is not a duration like 30d or 4w", {"value": text}
        )
    days = int(match.group(1)) * (7 if match.group(2) == "w" else 1)
    if days <= 0:
        raise InvalidArgument("cert.duration_invalid", "the duration must be positive")
    return days


def normalize_serial(text: str) -> str:
    """The CA's spelling: upper-case hex without separators (openssl prints colons)."""
    serial = text.strip().replace(":", "").upper()
    if not _SERIAL_RE.match(serial):
        raise InvalidArgument(
            "cert.serial_invalid", f"{text!r} is not a hexadecimal serial", {"value": text}
        )
    return serial


def status_name(status: ca_pb2.CertificateStatus.ValueType) -> str:
    return ca_pb2.CertificateStatus.Name(status).removeprefix("CERTIFICATE_STATUS_").lower()


def record_to_dict(record: ca_pb2.CertificateRecord) -> dict[str, Any]:
    """The stable json shape of a certificate record (serials as openssl prints them)."""
    revoked = record.status == ca_pb2.CERTIFICATE_STATUS_REVOKED
    return {
        "serial": openssl_serial(record.serial),
        "profile": record.profile,
        "status": status_name(record.status),
        "state": record_state(record),
        "subject": record.subject,
        "sans": list(record.sans),
        "key_type": record.key_type,
        "not_before": record.not_before,
        "not_after": record.not_after,
        "issued_at": record.issued_at,
        "requester": record.requester,
        "revoked_at": record.revoked_at if revoked else "",
        "revocation_reason": _REASON_NAMES.get(record.revocation_reason, "unspecified")
        if revoked
        else "",
        "renewed_from": openssl_serial(record.renewed_from) if record.renewed_from else "",
        "superseded_by": openssl_serial(record.superseded_by) if record.superseded_by else "",
    }


def record_state(record: ca_pb2.CertificateRecord, now: str | None = None) -> str:
    """revoked, expired, superseded (renewed, still valid) or valid."""
    if record.status == ca_pb2.CERTIFICATE_STATUS_REVOKED:
        return "revoked"
    now = now or datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if record.not_after and record.not_after < now:
        return "expired"
    return "superseded" if record.superseded_by else "valid"


def record_details(record: ca_pb2.CertificateRecord) -> str:
    d = record_to_dict(record)
    lines = [f"{k + ':':<18} {v}" for k, v in d.items() if k != "sans" and v != ""]
    lines.insert(4, f"{'sans:':<18} {', '.join(d['sans']) or '-'}")
    return "\n".join(lines)


def _pem_chain(cert_der: bytes, chain_der: list[bytes]) -> bytes:
    """Certificate then chain as PEM, byte for byte what mgmt.bundle.pem_bundle writes,
    without loading cryptography's x509 (~40 ms of every `cert issue`) to do it: PEM is
    the DER in base64, 64 characters a line, between the two markers."""
    out = []
    for der in [cert_der, *chain_der]:
        text = base64.b64encode(der).decode("ascii")
        lines = [text[i : i + 64] for i in range(0, len(text), 64)]
        out.append(
            "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"
        )
    return "".join(out).encode("ascii")


def lifetime_seconds(days: int, ttl: str | None) -> int:
    """--ttl (30m, 12h, 90d) as seconds for the CA; refused next to --days."""
    if ttl is None:
        return 0
    if days:
        raise click.UsageError("give --days or --ttl, not both")
    from edgekms.durations import parse_ttl

    return int(parse_ttl(ttl).total_seconds())


_TTL_HELP = (
    "Lifetime: 30m, 12h, 90d or 4w (5m at least; the profile's maximum applies). Instead of --days."
)


def read_password(path: Path) -> bytes:
    """The first line of the file; a file without one is refused."""
    lines = path.read_bytes().splitlines()
    password = lines[0] if lines else b""
    if not password:
        raise InvalidArgument("bundle.password_missing", f"{path} holds no password")
    return password


@click.group("cert")
def cert_group() -> None:
    """Certificates from the mini-CA: issue, list, show, revoke, renew.

    \b
    kmsctl cert issue --profile https-server --generate --cn nas.home.arpa \\
        --san dns:nas.home.arpa --san ip:192.168.1.10 --out nas.crt --key-out nas.key
    kmsctl cert issue --profile vpn-client --generate --cn phone --format pkcs12 \\
        --password-file pw.txt --out phone.p12
    kmsctl cert revoke SERIAL --reason key-compromise
    """


@cert_group.command("issue")
@click.option("--profile", required=True, help="https-server, vpn-server, vpn-client, device...")
@click.option(
    "--csr",
    "csr_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A PKCS#10 request (PEM or DER) made elsewhere, e.g. with `openssl req`.",
)
@click.option("--generate", is_flag=True, help="Make the key here and write it out.")
@click.option("--cn", default="", help="Subject common name (with --generate).")
@click.option(
    "--san",
    "sans",
    multiple=True,
    help="dns:NAME, ip:ADDR, email:ADDR or uri:URI (with --generate; repeatable).",
)
@click.option(
    "--key-type",
    default="ec-p256",
    show_default=True,
    help="Key made by --generate: ec-p256, ec-p384, rsa-2048, rsa-3072, ed25519.",
)
@click.option("--days", type=click.IntRange(min=0), default=0, help="0: the profile's default.")
@click.option("--ttl", default=None, help=_TTL_HELP)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["pem", "pkcs12"]),
    default="pem",
    show_default=True,
    help="pkcs12: key, certificate and chain in one file (with --generate).",
)
@click.option(
    "--out",
    required=True,
    help="Certificate then chain as PEM (nginx ssl_certificate), or the PKCS#12 file.",
)
@click.option(
    "--key-out", default=None, help="Private key PEM (0600), with --generate --format pem."
)
@click.option(
    "--legacy",
    is_flag=True,
    help="With --format pkcs12: the old 3DES/SHA-1 form for importers that refuse AES "
    "(older Android, macOS, Windows). Weaker; kmsctl warns.",
)
@click.option(
    "--password-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="PKCS#12 password (first line). Required for pkcs12.",
)
@output_option
@client_options
def issue_cmd(
    profile: str,
    csr_path: Path | None,
    generate: bool,
    cn: str,
    sans: tuple[str, ...],
    key_type: str,
    days: int,
    ttl: str | None,
    fmt: str,
    out: str,
    key_out: str | None,
    legacy: bool,
    password_file: Path | None,
    output: str,
    data_dir: Path,
    config_path: Path | None,
) -> None:
    """Issue a certificate for a CSR (--csr) or for a key made here (--generate)."""
    from mgmt.outfile import write_private

    if bool(csr_path) == generate:
        raise click.UsageError("give exactly one of --csr FILE and --generate")
    if csr_path is not None and (cn or sans or fmt != "pem" or key_out or password_file):
        raise click.UsageError(
            "--cn, --san, --format, --key-out and --password-file need --generate"
        )
    if generate:
        if fmt == "pem" and not key_out:
            raise click.UsageError("--generate --format pem needs --key-out for the private key")
        if fmt == "pkcs12" and (password_file is None or key_out):
            raise click.UsageError("--format pkcs12 needs --password-file (and no --key-out)")
    if legacy and fmt != "pkcs12":
        raise click.UsageError("--legacy is for --format pkcs12")
    password = read_password(password_file) if password_file is not None else None
    seconds = lifetime_seconds(days, ttl)

    key: LeafKey | None = None
    if csr_path is not None:
        csr = csr_path.read_bytes()
    else:
        from mgmt import bundle  # cryptography's x509 and pkcs12: only to make a key here

        key = bundle.generate_key(key_type)
        csr = bundle.make_csr(key, cn, list(sans))
    with open_client(data_dir, config_path) as kms:
        response = kms.issue_certificate(profile, csr, days, validity_seconds=seconds)
    chain = list(response.chain_der)
    if key is not None and fmt == "pkcs12":
        assert password is not None
        name = cn or response.record.serial
        if legacy:
            click.echo(bundle.LEGACY_WARNING, err=True)
        data = bundle.pkcs12_bundle(
            name, key, response.certificate_der, chain, password, legacy=legacy
        )
        write_private(Path(out), data)
    else:
        if key is not None:
            assert key_out is not None
            write_private(Path(key_out), bundle.key_pem(key))
        write_output(out, _pem_chain(response.certificate_der, chain))
    log.info("event=cert_issued serial=%s profile=%s", response.record.serial, profile)
    if output == "json":
        echo_json(record_to_dict(response.record))
    else:
        click.echo(
            f"issued {openssl_serial(response.record.serial)} ({profile}) "
            f"until {response.record.not_after}"
        )


_STATES: dict[str, ca_pb2.CertificateState.ValueType] = {
    "any": ca_pb2.CERTIFICATE_STATE_ANY,
    "valid": ca_pb2.CERTIFICATE_STATE_VALID,
    "revoked": ca_pb2.CERTIFICATE_STATE_REVOKED,
    "expired": ca_pb2.CERTIFICATE_STATE_EXPIRED,
    "superseded": ca_pb2.CERTIFICATE_STATE_SUPERSEDED,
}


@cert_group.command("list")
@click.option("--expiring", default=None, help="Only valid ones ending within, e.g. 30d or 4w.")
@click.option("--revoked", is_flag=True, help="Only revoked ones (same as --state revoked).")
@click.option(
    "--state",
    type=click.Choice(list(_STATES)),
    default="any",
    show_default=True,
    help="valid: neither revoked nor expired; superseded: renewed since.",
)
@click.option("--profile", default="", help="Only this profile's.")
@click.option(
    "--match", default="", help="Subject or SAN containing this, any case (e.g. nas.home)."
)
@click.option(
    "--issued-after", default="", help="Only issued after this UTC time, 2026-01-31T00:00:00Z."
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after this many (the CA is asked a page at a time either way).",
)
@output_option
@client_options
def list_cmd(
    expiring: str | None,
    revoked: bool,
    state: str,
    profile: str,
    match: str,
    issued_after: str,
    limit: int | None,
    output: str,
    data_dir: Path,
    config_path: Path | None,
) -> None:
    """Certificates the CA issued, soonest to expire first.

    The CA answers in pages; this fetches them one after another, so a CA holding tens
    of thousands of certificates lists them all. Filters run in the CA:

    \b
      kmsctl cert list --expiring 30d           renew these soon
      kmsctl cert list --match nas.home.arpa    by subject or SAN
      kmsctl cert list --state superseded       renewed: candidates to revoke
    """
    within = parse_days(expiring) if expiring is not None else 0
    with open_client(data_dir, config_path) as kms:
        found = kms.iter_certificates(
            revoked_only=revoked,
            expiring_within_days=within,
            profile=profile,
            match=match,
            state=_STATES[state],
            issued_after=issued_after,
        )
        records = list(itertools.islice(found, limit))
    if output == "json":
        echo_json([record_to_dict(r) for r in records])
        return
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows = [
        [
            openssl_serial(r.serial),
            r.profile,
            record_state(r, now),
            r.not_after,
            r.subject or ",".join(r.sans),
        ]
        for r in records
    ]
    click.echo(table(["SERIAL", "PROFILE", "STATE", "NOT_AFTER", "SUBJECT"], rows))


@cert_group.command("show")
@click.argument("serial")
@click.option("--out", default=None, help="Also write the certificate as PEM here.")
@output_option
@client_options
def show_cmd(
    serial: str, out: str | None, output: str, data_dir: Path, config_path: Path | None
) -> None:
    """One certificate's record."""
    with open_client(data_dir, config_path) as kms:
        record = kms.get_certificate(normalize_serial(serial))
    if out:
        write_output(out, _pem_chain(record.certificate_der, []))
    if output == "json":
        echo_json(record_to_dict(record))
    else:
        click.echo(record_details(record))


@cert_group.command("revoke")
@click.argument("serial")
@click.option(
    "--reason",
    type=click.Choice(list(REASONS)),
    default="unspecified",
    show_default=True,
)
@output_option
@client_options
def revoke_cmd(
    serial: str, reason: str, output: str, data_dir: Path, config_path: Path | None
) -> None:
    """Revoke a certificate; the CA builds a new CRL within moments (`kmsctl ca crl`
    waits for it) and answers OCSP with "revoked" at once."""
    with open_client(data_dir, config_path) as kms:
        response = kms.revoke_certificate(normalize_serial(serial), REASONS[reason])
    if output == "json":
        echo_json({**record_to_dict(response.record), "crl_number": response.crl_number})
    else:
        click.echo(
            f"revoked {openssl_serial(response.record.serial)} ({reason}); "
            f"in CRL {response.crl_number} and later"
        )


@cert_group.command("renew")
@click.argument("serial", required=False, default="")
@click.option(
    "--self",
    "by_holder",
    is_flag=True,
    help="Renewal by the holder: prove possession of --key instead of naming a SERIAL "
    "(any role); the old certificate is revoked as superseded.",
)
@click.option(
    "--cert",
    "cert_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="With --self: the certificate to renew (PEM; a chain file's first certificate).",
)
@click.option(
    "--key",
    "key_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="With --self: its private key (PEM).",
)
@click.option("--rekey", is_flag=True, help="With --self: certify a new key of the same type.")
@click.option(
    "--key-out",
    default=None,
    help="With --rekey: where the new key goes (0600). [default: --key, replaced]",
)
@click.option("--days", type=click.IntRange(min=0), default=0, help="0: the profile's default.")
@click.option("--ttl", default=None, help=_TTL_HELP)
@click.option(
    "--out",
    default=None,
    help="The new certificate then chain, PEM. [default: --cert with --self; else required]",
)
@output_option
@client_options
def renew_cmd(
    serial: str,
    by_holder: bool,
    cert_path: Path | None,
    key_path: Path | None,
    rekey: bool,
    key_out: str | None,
    days: int,
    ttl: str | None,
    out: str | None,
    output: str,
    data_dir: Path,
    config_path: Path | None,
) -> None:
    """A new certificate (new serial) for the same subject and SANs.

    \b
    By serial (operators): same key; the old one stays valid until it expires or is
    revoked:
      kmsctl cert renew 5F1C... --out nas.crt
    By the holder (--self, any role): proof of possession of the key; the old one is
    revoked with reason superseded once the new one is stored:
      kmsctl cert renew --self --cert nas.crt --key nas.key
      kmsctl cert renew --self --cert nas.crt --key nas.key --rekey
    A revoked, expired or already renewed certificate is refused (exit 6).
    """
    seconds = lifetime_seconds(days, ttl)
    if by_holder:
        if serial:
            raise click.UsageError("--self renews the certificate of --cert: no SERIAL")
        if cert_path is None or key_path is None:
            raise click.UsageError("--self needs --cert and --key")
        from mgmt.renew import key_pem, load_certificate, load_private_key, renew_held

        cert = load_certificate(cert_path)
        key = load_private_key(key_path)
        with open_client(data_dir, config_path) as kms:
            done = renew_held(
                kms, cert, key, rekey=rekey, validity_days=days, validity_seconds=seconds
            )
        response = done.response
        if done.new_key is not None:
            from mgmt.outfile import write_private

            write_private(Path(key_out or str(key_path)), key_pem(done.new_key))
        write_output(
            out or str(cert_path), _pem_chain(response.certificate_der, list(response.chain_der))
        )
    else:
        if not serial or cert_path or key_path or rekey or key_out:
            raise click.UsageError("give a SERIAL, or --self with --cert and --key")
        if out is None:
            raise click.UsageError("--out is required with a SERIAL")
        with open_client(data_dir, config_path) as kms:
            response = kms.renew_certificate(
                normalize_serial(serial), days, validity_seconds=seconds
            )
        write_output(out, _pem_chain(response.certificate_der, list(response.chain_der)))
    if output == "json":
        echo_json(record_to_dict(response.record))
    else:
        click.echo(
            f"renewed {openssl_serial(response.record.renewed_from)} as "
            f"{openssl_serial(response.record.serial)} "
            f"until {response.record.not_after}"
        )


def register(cli: click.Group) -> None:
    cli.add_command(cert_group)
