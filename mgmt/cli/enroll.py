"""`kmsctl enroll ...`: a device enrolls itself from a one-time token, and the
administrator's side of it, `kmsctl enroll token create|list|revoke`.

Enrollment runs on the device and needs no client config: only the broker's
enrollment address, the token and the CA fingerprint `token create` printed
(mgmt/enroll.py pins the CA by that fingerprint before the token travels).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from edgekms.v1 import enroll_pb2
from mgmt.cli.client_access import client_options, open_client
from mgmt.cli.output import echo_json, handle_errors, table


def token_to_dict(token: enroll_pb2.EnrollToken) -> dict[str, Any]:
    """The stable json shape of a token (never its secret)."""
    return {
        "id": token.id,
        "name": token.name,
        "profile": token.profile,
        "sans": list(token.sans),
        "group": token.group,
        "state": enroll_pb2.EnrollTokenState.Name(token.state)
        .removeprefix("ENROLL_TOKEN_STATE_")
        .lower(),
        "expires_at": token.expires_at,
        "created_at": token.created_at,
        "created_by": token.created_by,
        "used_at": token.used_at,
        "serial": token.serial,
        "attest": token.attest,
        "ek_sha256": token.ek_sha256.hex(),
    }


@click.group("enroll", invoke_without_command=True)
@click.option("--server", default=None, help="The broker's enrollment listener, HOST:PORT.")
@click.option("--token", "token_file", default=None, help="File holding the token ('-': stdin).")
@click.option("--fingerprint", default=None, help="SHA-256 of the CA certificate (64 hex).")
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where device.key (0600; with --tpm device.tss2.pem), device.crt, ca.crt and "
    "config.toml go.",
)
@click.option(
    "--tpm",
    is_flag=True,
    help="Make the key in the device's TPM; it never leaves it (see --tpm-tcti).",
)
@click.option(
    "--tpm-tcti",
    envvar="EDGEKMS_TPM_TCTI",
    default="/dev/tpmrm0",
    show_default=True,
    metavar="DEVICE|TCTI",
    help="With --tpm: the TPM, a device or a TCTI string (swtpm:path=DIR/swtpm.sock); "
    "env EDGEKMS_TPM_TCTI.",
)
@click.option(
    "--pkcs11",
    default=None,
    metavar="LABEL|URI",
    help="Make the key in this PKCS#11 token (its label, or pkcs11:token=LABEL); it never "
    "leaves it. Needs --pkcs11-module and the PIN from --pkcs11-pin-file or the env.",
)
@click.option(
    "--pkcs11-module",
    envvar="EDGEKMS_PKCS11_MODULE",
    default=None,
    help="With --pkcs11: the PKCS#11 module (.so); env EDGEKMS_PKCS11_MODULE.",
)
@click.option(
    "--pkcs11-pin-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="With --pkcs11: file holding the user PIN (else the variable --pkcs11-pin-env names).",
)
@click.option(
    "--pkcs11-pin-env",
    default="EDGEKMS_PKCS11_PIN",
    show_default=True,
    help="With --pkcs11: environment variable holding the PIN (never give the PIN in argv).",
)
@click.option(
    "--attest",
    is_flag=True,
    help="TPM-attested enrollment: prove this TPM by its EK (credential activation over a "
    "fresh server nonce) and have the key made in it, certified by its AK (TPM from "
    "--tpm-tcti).",
)
@click.option(
    "--endorsement-auth-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="The endorsement hierarchy's auth value (--attest on a provisioned TPM).",
)
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
@handle_errors
def enroll_group(
    ctx: click.Context,
    server: str | None,
    token_file: str | None,
    fingerprint: str | None,
    out_dir: Path | None,
    tpm: bool,
    attest: bool,
    tpm_tcti: str,
    endorsement_auth_file: Path | None,
    pkcs11: str | None,
    pkcs11_module: str | None,
    pkcs11_pin_file: Path | None,
    pkcs11_pin_env: str,
    output: str,
) -> None:
    """Enroll this device with a one-time token, or manage tokens (`enroll token`).

    \b
    On the device:
      kmsctl enroll --server kms.home.arpa:8444 --token token.txt \\
          --fingerprint 3f1c...e9 --out-dir /etc/edgekms
      kmsctl key sign devices/DEV/app --in f --out f.sig --config /etc/edgekms/config.toml
    The token is read from a file (never argv: it would show in `ps`). The key is
    made here (EC P-256, 0600) and only a CSR leaves the device. Exit 7 for a token that
    is wrong, used, revoked or expired, or a CA that does not match the fingerprint.

    \b
    With the key in the device's TPM (it never leaves it; the TPM signs the CSR and
    every TLS handshake, through the tpm2-openssl provider):
      kmsctl enroll --tpm --tpm-tcti /dev/tpmrm0 --server ... --out-dir /etc/edgekms
    Exit 6 if the TPM cannot be used (nothing is written, the token is not sent).

    \b
    With the key in a PKCS#11 token (the PIN from a file or EDGEKMS_PKCS11_PIN):
      kmsctl enroll --pkcs11 devtoken --pkcs11-module /usr/lib/softhsm/libsofthsm2.so \\
          --pkcs11-pin-file /etc/edgekms/pin --server ... --out-dir /etc/edgekms
    Exit 7 for a wrong PIN, 6 for a token that is not there (nothing written or spent).

    \b
    Proven by the device's TPM (docs/security.md, "TPM-attested enrollment"):
      kmsctl enroll --attest --tpm-tcti /dev/tpmrm0 --server kms.home.arpa:8444 \\
          --token token.txt --fingerprint 3f1c...e9 --out-dir /etc/edgekms
    The TPM's EK (its manufacturer certificate, or an EK the token registers) answers
    a one-time challenge; the key is made in the TPM and never leaves it. The out-dir
    then holds config.toml (key_store = "tpm", as with --tpm) for --config, and
    device.json for `kmsctl unlock fetch`.
    """
    if ctx.invoked_subcommand is not None:
        return
    if not (server and token_file and fingerprint and out_dir):
        raise click.UsageError("enroll needs --server, --token, --fingerprint and --out-dir")
    if attest and pkcs11:
        raise click.UsageError("--attest proves a TPM: give it without --pkcs11")
    slot = None
    if tpm and pkcs11:
        raise click.UsageError("give --tpm or --pkcs11, not both")
    if pkcs11:
        from mgmt.devicekey import Pkcs11Slot

        label, uri_module = _parse_pkcs11(pkcs11)
        module = uri_module or pkcs11_module
        if not module:
            raise click.UsageError("--pkcs11 needs --pkcs11-module (or EDGEKMS_PKCS11_MODULE)")
        slot = Pkcs11Slot(
            module, label, str(pkcs11_pin_file) if pkcs11_pin_file else "", pkcs11_pin_env
        )
    from mgmt.enroll import enroll

    if token_file == "-":  # noqa: S105 - stdin, not a password
        raw = sys.stdin.read()
    else:
        try:
            raw = Path(token_file).read_text()
        except OSError as exc:
            raise click.UsageError(f"cannot read the token from {token_file}: {exc}") from None
    if attest:
        _attested(
            server, raw.strip(), fingerprint, out_dir, tpm_tcti, endorsement_auth_file, output
        )
        return
    done = enroll(
        server, raw.strip(), fingerprint, out_dir, tpm=tpm_tcti if tpm else None, pkcs11=slot
    )
    client = done.response.client
    if output == "json":
        echo_json(
            {
                "name": client.name,
                "role": client.role,
                "keys": client.key_pattern,
                "serial": client.serial,
                "not_after": client.not_after,
                "config": str(done.config),
                "files": [str(f) for f in done.files],
            }
        )
        return
    click.echo(f"enrolled as {client.name} ({client.role}, keys {client.key_pattern or '*'})")
    click.echo(f"  config: {done.config}")


def _parse_pkcs11(value: str) -> tuple[str, str]:
    """(token label, module path or "") from a label or an RFC 7512 URI
    (`pkcs11:token=dev?module-path=/usr/lib/softhsm/libsofthsm2.so`). A PIN in the URI
    (pin-value) is refused: it would show in `ps`."""
    from urllib.parse import unquote

    if not value.startswith("pkcs11:"):
        return value, ""
    path, _, query = value.removeprefix("pkcs11:").partition("?")
    attrs = {}
    for part in [*path.split(";"), *query.split("&")]:
        name, _, item = part.partition("=")
        if name:
            attrs[name] = unquote(item)
    if "pin-value" in attrs:
        raise click.UsageError("no pin-value in the URI: give --pkcs11-pin-file or the env")
    if not attrs.get("token"):
        raise click.UsageError(f"{value!r} names no token (pkcs11:token=LABEL)")
    return attrs["token"], attrs.get("module-path", "")


def _attested(
    server: str,
    token: str,
    fingerprint: str,
    out_dir: Path,
    tcti: str,
    endorsement_auth_file: Path | None,
    output: str,
) -> None:
    from mgmt.attested_enroll import attested_enroll
    from mgmt.cli.tpm import tcti_of

    auth = endorsement_auth_file.read_bytes().rstrip(b"\n") if endorsement_auth_file else b""
    done = attested_enroll(
        server, token, fingerprint, out_dir, tcti_of(tcti), endorsement_auth=auth
    )
    client = done.response.client
    if output == "json":
        echo_json(
            {
                "name": client.name,
                "role": client.role,
                "keys": client.key_pattern,
                "serial": client.serial,
                "not_after": client.not_after,
                "ek_sha256": done.ek_sha256,
                "config": str(done.config),
                "files": [str(f) for f in done.files],
            }
        )
        return
    click.echo(f"enrolled as {client.name} ({client.role}), TPM-attested")
    click.echo(f"  ek_sha256: {done.ek_sha256}")
    click.echo(f"  config:    {done.config}  (the key stays in the TPM; use --config)")


def ek_sha256_of(value: str) -> bytes:
    """64 hex digits, or a file: a PEM public key, or an EK certificate (PEM or DER)."""
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    hexed = value.lower()
    if len(hexed) == 64 and all(c in "0123456789abcdef" for c in hexed):
        return bytes.fromhex(hexed)
    try:
        data = Path(value).read_bytes()
    except OSError as exc:
        raise click.BadParameter(f"not 64 hex digits, nor a readable file: {exc}") from None
    key: Any
    try:
        if b"CERTIFICATE" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        elif b"PUBLIC KEY" in data:
            key = serialization.load_pem_public_key(data)
        else:
            key = x509.load_der_x509_certificate(data).public_key()
    except ValueError:
        raise click.BadParameter(
            f"{value}: not a PEM public key or an EK certificate (PEM or DER)"
        ) from None
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


@enroll_group.command("fingerprint")
@client_options
def fingerprint_cmd(data_dir: Path, config_path: Path | None) -> None:
    """Print the internal CA's SHA-256 fingerprint (what `kmsctl enroll --fingerprint`
    pins), from this client config's CA file: no broker needed."""
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from mgmt.cli.common import client_config_path
    from mgmt.clientconfig import load_client_config

    config = load_client_config(config_path or client_config_path(data_dir))
    ca = x509.load_pem_x509_certificates(config.ca_cert.read_bytes())[0]
    click.echo(hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).hexdigest())


@enroll_group.group("token")
def token_group() -> None:
    """One-time enrollment tokens (administrators).

    \b
      kmsctl enroll token create sensor-7 --profile device --group sensors --ttl 1h
      kmsctl enroll token list
      kmsctl enroll token revoke ID
    """


@token_group.command("create")
@click.argument("name")
@click.option("--profile", default="device", show_default=True, help="What the device becomes.")
@click.option("--san", "sans", multiple=True, help="dns:NAME or ip:ADDR the CSR may name.")
@click.option(
    "--ttl", default="1h", show_default=True, help="How long it may be redeemed: 30m, 2h, 7d."
)
@click.option("--group", default="", help="The device's group (for `device deny --group`).")
@click.option(
    "--attest",
    is_flag=True,
    help="Redeemable only by a TPM-attested enrollment (`kmsctl enroll --attest`).",
)
@click.option(
    "--ek",
    default=None,
    metavar="FILE|SHA256",
    help="Register the device's EK (PEM public key from `kmsctl tpm ek --out`, its "
    "certificate, or its 64-hex SHA-256): only that TPM may redeem the token. Implies --attest.",
)
@click.option(
    "--token-out",
    default=None,
    help="Write the token to this file (0600) instead of printing it.",
)
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
@client_options
def create_cmd(
    name: str,
    profile: str,
    sans: tuple[str, ...],
    ttl: str,
    group: str,
    attest: bool,
    ek: str | None,
    token_out: str | None,
    output: str,
    data_dir: Path,
    config_path: Path | None,
) -> None:
    """A one-time token for device NAME; prints it (once) and the CA fingerprint.

    The token is kept only as a hash; it is bound to NAME, the profile, the SANs and
    the group, and is spent by one enrollment.
    """
    from edgekms.durations import parse_ttl

    seconds = int(parse_ttl(ttl, "enroll.ttl_invalid").total_seconds())
    ek_sha256 = ek_sha256_of(ek) if ek else b""
    with open_client(data_dir, config_path) as kms:
        made = kms.create_enroll_token(
            name,
            profile,
            sans=list(sans),
            ttl_seconds=seconds,
            group=group,
            attest=attest,
            ek_sha256=ek_sha256,
        )
    if token_out:
        from mgmt.pki import write_private

        write_private(Path(token_out), (made.token_string + "\n").encode())
    if output == "json":
        out = {**token_to_dict(made.token), "fingerprint": made.ca_fingerprint}
        if not token_out:
            out["token"] = made.token_string
        echo_json(out)
        return
    if not token_out:
        click.echo(f"token:       {made.token_string}")
    click.echo(f"fingerprint: {made.ca_fingerprint}")
    click.echo(f"id:          {made.token.id} (expires {made.token.expires_at})")


@token_group.command("list")
@click.option("--all", "include_spent", is_flag=True, help="Also used, revoked and expired ones.")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
@client_options
def list_cmd(include_spent: bool, output: str, data_dir: Path, config_path: Path | None) -> None:
    """Tokens not yet spent (with --all: every one)."""
    with open_client(data_dir, config_path) as kms:
        tokens = [token_to_dict(t) for t in kms.iter_enroll_tokens(include_spent)]
    if output == "json":
        echo_json(tokens)
        return
    rows = [
        (t["id"], t["name"], t["profile"], t["group"], t["state"], t["expires_at"]) for t in tokens
    ]
    click.echo(table(("ID", "NAME", "PROFILE", "GROUP", "STATE", "EXPIRES"), rows))


@token_group.command("revoke")
@click.argument("token_id")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
@client_options
def revoke_cmd(token_id: str, output: str, data_dir: Path, config_path: Path | None) -> None:
    """Revoke token ID: redeeming it is refused from now on."""
    with open_client(data_dir, config_path) as kms:
        token = kms.revoke_enroll_token(token_id)
    if output == "json":
        echo_json(token_to_dict(token))
        return
    click.echo(f"token {token.id} for {token.name} revoked")


def register(cli: click.Group) -> None:
    cli.add_command(enroll_group)
