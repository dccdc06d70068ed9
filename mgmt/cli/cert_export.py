"""`kmsctl cert export`: an issued certificate and the key kept for it, packed the way
people import them: an OpenVPN client profile (.ovpn) or a PKCS#12 bundle (optionally
the legacy 3DES form).

The key never goes to the CA: it is read here from the file `--generate --key-out`
wrote, checked against the certificate, and written only into the output file (0600).
The certificate and the chain come from the CA, so the bundle is what the CA issued.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from edgekms.errors import FailedPrecondition
from edgekms.v1 import ca_pb2
from mgmt.cli.certs import cert_group, normalize_serial, read_password
from mgmt.cli.client_access import client_options, open_client
from mgmt.cli.common import output_option
from mgmt.cli.output import echo_json

log = logging.getLogger(__name__)


def issuing_chain(cert_der: bytes, ca_certs: ca_pb2.GetCACertificatesResponse) -> list[bytes]:
    """The intermediate that issued this certificate (after a rotation possibly a
    retired one, matched by key identifier), then every other intermediate in force,
    then the root: the client checks the server's chain with it, and the server's
    certificate may come from either intermediate during the overlap."""
    # Here, not at the top: every `kmsctl cert` command loads this module, and
    # cryptography's x509 costs ~60 ms of a `cert issue` that never uses it.
    from cryptography import x509

    cert = x509.load_der_x509_certificate(cert_der)
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        wanted = aki.key_identifier
    except x509.ExtensionNotFound:
        wanted = None
    intermediates = [ca_certs.intermediate_certificate_der, *ca_certs.retired_intermediates_der]

    def issued_it(der: bytes) -> bool:
        ski = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        )
        return ski.value.digest == wanted

    intermediates.sort(key=lambda d: not issued_it(d))
    return [*intermediates, ca_certs.root_certificate_der]


@cert_group.command("export")
@click.argument("serial")
@click.option(
    "--key",
    "key_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The certificate's private key, PEM (what `cert issue --generate --key-out` wrote).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["ovpn", "pkcs12"]),
    default="ovpn",
    show_default=True,
    help="ovpn: OpenVPN client profile; pkcs12: key, certificate and chain.",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--remote", default=None, help="ovpn: the server, HOST or HOST:PORT (1194).")
@click.option("--proto", type=click.Choice(["udp", "tcp"]), default="udp", show_default=True)
@click.option(
    "--server-name",
    default="",
    help="ovpn: the server certificate's name, pinned with verify-x509-name.",
)
@click.option(
    "--tls-crypt",
    "tls_crypt_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="ovpn: include this tls-crypt key; if the file does not exist a new key is made "
    "there (0600, as `openvpn --genkey tls-crypt`): give the server the same file.",
)
@click.option(
    "--password-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="pkcs12: the password (first line).",
)
@click.option("--legacy", is_flag=True, help="pkcs12: the 3DES/SHA-1 form for old importers.")
@output_option
@client_options
def export_cmd(
    serial: str,
    key_path: Path,
    fmt: str,
    out: Path,
    remote: str | None,
    proto: str,
    server_name: str,
    tls_crypt_path: Path | None,
    password_file: Path | None,
    legacy: bool,
    output: str,
    data_dir: Path,
    config_path: Path | None,
) -> None:
    """Pack certificate SERIAL with its key for import.

    \b
    kmsctl cert export SERIAL --key laptop.key --remote vpn.home.arpa:1194 \\
        --tls-crypt ta.key --out laptop.ovpn
    kmsctl cert export SERIAL --key phone.key --format pkcs12 --legacy \\
        --password-file pw.txt --out phone.p12

    The server takes the same CA chain (`kmsctl ca certs`), `remote-cert-tls client`
    and, with --tls-crypt, `tls-crypt ta.key`."""
    from mgmt import bundle, ovpn
    from mgmt.pki import write_private

    if fmt == "ovpn":
        if remote is None:
            raise click.UsageError("--format ovpn needs --remote HOST[:PORT]")
        if password_file is not None or legacy:
            raise click.UsageError("--password-file and --legacy are for --format pkcs12")
        where = ovpn.Remote.parse(remote, proto)
    else:
        if password_file is None:
            raise click.UsageError("--format pkcs12 needs --password-file")
        if remote is not None or tls_crypt_path is not None or server_name:
            raise click.UsageError("--remote, --server-name and --tls-crypt are for --format ovpn")
    key_bytes = key_path.read_bytes()
    key = bundle.load_leaf_key(key_bytes)
    tls_crypt: bytes | None = None
    made_tls_crypt = False
    if tls_crypt_path is not None:
        if tls_crypt_path.exists():
            tls_crypt = ovpn.check_tls_crypt_key(tls_crypt_path.read_bytes())
        else:
            tls_crypt, made_tls_crypt = ovpn.new_tls_crypt_key(), True

    with open_client(data_dir, config_path) as kms:
        record = kms.get_certificate(normalize_serial(serial))
        ca_certs = kms.get_ca_certificates()
    if record.status == ca_pb2.CERTIFICATE_STATUS_REVOKED:
        raise FailedPrecondition(
            "cert.revoked", f"certificate {record.serial} is revoked: issue a new one"
        )
    bundle.check_key_matches(key, record.certificate_der)
    chain = issuing_chain(record.certificate_der, ca_certs)
    from cryptography import x509

    if fmt == "ovpn":
        ovpn.check_client_certificate(x509.load_der_x509_certificate(record.certificate_der))
        data = ovpn.client_profile(
            where,
            record.certificate_der,
            chain,
            bundle.key_pem(key),
            tls_crypt=tls_crypt,
            server_name=server_name,
        )
    else:
        assert password_file is not None
        if legacy:
            click.echo(bundle.LEGACY_WARNING, err=True)
        name = x509.load_der_x509_certificate(record.certificate_der).subject.rfc4514_string()
        data = bundle.pkcs12_bundle(
            name or record.serial,
            key,
            record.certificate_der,
            chain,
            read_password(password_file),
            legacy=legacy,
        )
    if made_tls_crypt:
        assert tls_crypt_path is not None and tls_crypt is not None
        write_private(tls_crypt_path, tls_crypt)
        click.echo(
            f"made a new tls-crypt key in {tls_crypt_path}: the server needs the same file "
            f"(tls-crypt {tls_crypt_path.name})",
            err=True,
        )
    write_private(out, data)
    log.info("event=cert_exported serial=%s format=%s", record.serial, fmt)
    if output == "json":
        echo_json(
            {
                "serial": record.serial,
                "format": fmt,
                "legacy": legacy,
                "out": str(out),
                "tls_crypt": str(tls_crypt_path) if tls_crypt_path else "",
                "tls_crypt_created": made_tls_crypt,
            }
        )
    else:
        click.echo(f"wrote {out} ({fmt}{', legacy' if legacy else ''}) for {record.serial}")


def register(cli: click.Group) -> None:
    """cert_group is registered by mgmt.cli.certs; importing this module adds `export`."""
