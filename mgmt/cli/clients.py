"""`kmsctl client ...`: add, list and revoke the clients that may reach the broker.

`client add` makes the client's private key here, on the administrator's machine, sends
only its public half to the broker (ClientService.AddClient), and writes the key with
the certificate the broker's internal CA issued: PEM files plus a ready client config,
or one PKCS#12 file protected by a password read from a file (never from argv).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12

from edgekms.errors import FailedPrecondition, InvalidArgument
from edgekms.identity import ROLES
from edgekms.v1 import clients_pb2
from mgmt.cli.client_access import client_options, open_client, resolve_config
from mgmt.cli.common import output_option
from mgmt.cli.output import echo_json, table
from mgmt.pki import write_client_config, write_private, write_public

MIN_PASSWORD = 8


def client_to_dict(client: clients_pb2.Client) -> dict[str, Any]:
    """The stable json shape of a client record."""
    return {
        "name": client.name,
        "role": client.role,
        "keys": client.key_pattern or "*",
        "serial": client.serial,
        "not_before": client.not_before,
        "not_after": client.not_after,
        "status": clients_pb2.ClientStatus.Name(client.status)
        .removeprefix("CLIENT_STATUS_")
        .lower(),
        "created_at": client.created_at,
        "created_by": client.created_by,
        "revoked_at": client.revoked_at,
        "revoked_by": client.revoked_by,
    }


def read_password(path: Path) -> bytes:
    """The PKCS#12 password: the file's first line; short ones are refused."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(
            "client.password_unreadable", f"cannot read {path}: {exc.strerror or exc}"
        ) from None
    password = raw.splitlines()[0] if raw.strip() else b""
    if len(password) < MIN_PASSWORD:
        raise InvalidArgument(
            "client.password_short", f"the PKCS#12 password must be {MIN_PASSWORD}+ bytes"
        )
    return password


def _broker_of(config_path: Path) -> tuple[str, str]:
    """(broker address, server name) the new client should dial: the admin's own."""
    try:
        values = tomllib.loads(config_path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise FailedPrecondition(
            "config.unreadable", f"cannot read the client config {config_path}: {exc}"
        ) from None
    return str(values.get("broker", "")), str(values.get("server_name", ""))


@click.group("client")
def client_group() -> None:
    """Clients of the broker: their certificates, roles and key patterns.

    \b
    Examples:
      kmsctl client add nas-signer --role signer --keys 'nas/*' --out-dir ./nas
      kmsctl client add phone --role signer --p12 --password-file pw.txt --out-dir .
      kmsctl client list -o json
      kmsctl client revoke nas-signer
      kmsctl client renew --rekey          # the caller's own certificate
    """


@client_group.command("add")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(ROLES), help="The client's role.")
@click.option(
    "--keys",
    "key_pattern",
    default="",
    metavar="PATTERN",
    help="Glob of key names the client may use ('nas/*'; '*' also crosses '/'). [default: any]",
)
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Where to write NAME.key/NAME.crt/ca.crt/config.toml (or NAME.p12).",
)
@click.option("--p12", is_flag=True, help="Write one PKCS#12 file instead of PEM files.")
@click.option(
    "--password-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="File whose first line is the PKCS#12 password (required with --p12).",
)
@click.option("--days", type=click.IntRange(1, 3650), default=None, help="Validity in days.")
@output_option
@client_options
def add_cmd(
    name: str,
    role: str,
    key_pattern: str,
    out_dir: Path,
    p12: bool,
    password_file: Path | None,
    days: int | None,
    output: str,
    data_dir: Path,
    config_path: Path | None,
) -> None:
    """Issue a client certificate for NAME with role --role.

    The key pair is made here (EC P-256); only the public key goes to the broker.
    """
    if p12 and password_file is None:
        raise click.UsageError("--p12 needs --password-file")
    if password_file is not None and not p12:
        raise click.UsageError("--password-file goes with --p12")
    password = read_password(password_file) if password_file is not None else None
    targets = (
        [out_dir / f"{name}.p12"] if p12 else [out_dir / f"{name}.key", out_dir / f"{name}.crt"]
    )
    for target in targets:
        if target.exists():
            raise FailedPrecondition("client.file_exists", f"{target} exists; not overwriting it")
    key = ec.generate_private_key(ec.SECP256R1())
    public_der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    admin_config = config_path or resolve_config(data_dir)
    with open_client(data_dir, config_path) as kms:
        issued = kms.add_client(
            name, role, public_key_der=public_der, key_pattern=key_pattern, validity_days=days or 0
        )
    cert = x509.load_pem_x509_certificate(issued.certificate_pem.encode())
    ca = x509.load_pem_x509_certificate(issued.ca_certificate_pem.encode())
    written: list[str] = []
    if p12:
        assert password is not None
        bundle = pkcs12.serialize_key_and_certificates(
            name.encode(), key, cert, [ca], serialization.BestAvailableEncryption(password)
        )
        write_private(targets[0], bundle)
        written.append(str(targets[0]))
    else:
        write_private(
            targets[0],
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        write_public(targets[1], issued.certificate_pem.encode())
        write_public(out_dir / "ca.crt", issued.ca_certificate_pem.encode())
        broker, server_name = _broker_of(admin_config)
        config = out_dir / "config.toml"
        if not config.exists():
            values = {"broker": broker, "ca_cert": "ca.crt", "cert": targets[1].name}
            values["key"] = targets[0].name
            if server_name:
                values["server_name"] = server_name
            write_client_config(config, **values)
            written.append(str(config))
        written += [str(t) for t in targets] + [str(out_dir / "ca.crt")]
    if output == "json":
        echo_json({**client_to_dict(issued.client), "files": written})
        return
    click.echo(f"client {name}: role {role}, serial {issued.client.serial}")
    for path in written:
        click.echo(f"  wrote {path}")


@client_group.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked clients.")
@output_option
@client_options
def list_cmd(include_revoked: bool, output: str, data_dir: Path, config_path: Path | None) -> None:
    """List the clients added with `kmsctl client add`."""
    with open_client(data_dir, config_path) as kms:
        clients = kms.list_clients(include_revoked=include_revoked)
    if output == "json":
        echo_json([client_to_dict(c) for c in clients])
        return
    rows = [
        (d["name"], d["role"], d["keys"], d["status"], d["not_after"], d["serial"])
        for d in map(client_to_dict, clients)
    ]
    click.echo(table(("NAME", "ROLE", "KEYS", "STATUS", "NOT AFTER", "SERIAL"), rows))


@client_group.command("revoke")
@click.argument("name", required=False, default="")
@click.option(
    "--serial",
    default="",
    help="Revoke the certificate with this serial (hex) instead: any certificate the "
    "internal CA issued, also one `client add` did not make or that never connected.",
)
@output_option
@client_options
def revoke_cmd(
    name: str, serial: str, output: str, data_dir: Path, config_path: Path | None
) -> None:
    """Revoke NAME's certificate: the broker refuses it from its very next request.

    \b
      kmsctl client revoke backup-job
      kmsctl client revoke --serial 5f1c...      # e.g. a certificate found in a log
    The bootstrap admin is a client too (recorded at its first request): make another
    admin before revoking it.
    """
    if bool(name) == bool(serial):
        raise click.UsageError("give exactly one of NAME and --serial")
    with open_client(data_dir, config_path) as kms:
        client = kms.revoke_client(name=name, serial=serial)
    if output == "json":
        echo_json(client_to_dict(client))
        return
    who = f"client {client.name}" if client.name else "certificate"
    click.echo(f"{who} revoked (serial {client.serial})")


@client_group.command("renew")
@click.option("--rekey", is_flag=True, help="Make a new key (same type) and certify it instead.")
@click.option(
    "--days", type=click.IntRange(1, 3650), default=None, help="[default: the old lifetime]"
)
@output_option
@client_options
def renew_cmd(
    rekey: bool, days: int | None, output: str, data_dir: Path, config_path: Path | None
) -> None:
    """Renew the client certificate this config connects with, by itself.

    \b
      kmsctl client renew --config dev/config.toml            # same key
      kmsctl client renew --rekey -o json                      # a new key too
    The certificate (and with --rekey the key) the config names are replaced; the old
    certificate is refused by the broker from then on (auth.superseded). Any role may
    renew its own certificate; a revoked, expired or denied one cannot.
    """
    from mgmt.renew import renew_client_config

    done = renew_client_config(
        config_path or resolve_config(data_dir), rekey=rekey, validity_days=days or 0
    )
    if output == "json":
        echo_json(
            {
                **client_to_dict(done.response.client),
                "rekeyed": done.rekeyed,
                "files": [str(done.cert_path)] + ([str(done.key_path)] if done.rekeyed else []),
            }
        )
        return
    client = done.response.client
    click.echo(f"client {client.name}: renewed, serial {client.serial}, until {client.not_after}")


def register(cli: click.Group) -> None:
    cli.add_command(client_group)
