"""`kmsctl unlock ...`: disk-unlock secrets released to TPM-attested devices against a
quote (administrators: add, list, show, rotate, remove; on the device: fetch, pcrs).
docs/security.md, "Remote unlock"."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path
from typing import Any

import click

from edgekms.v1 import enroll_pb2
from mgmt.cli.client_access import client_options, open_client
from mgmt.cli.output import echo_json, handle_errors, table

MAX_SECRET = 4096
DEFAULT_KEY = "unlock"


def secret_to_dict(secret: enroll_pb2.UnlockSecret) -> dict[str, Any]:
    """The stable json shape of an unlock secret (its policy; never the secret)."""
    return {
        "device": secret.device,
        "volume": secret.volume,
        "key": secret.key_name,
        "key_version": secret.key_version,
        "ek_sha256": secret.ek_sha256.hex(),
        "pcrs": list(secret.pcrs),
        "pcr_digest": secret.pcr_digest.hex(),
        "not_before": secret.not_before,
        "not_after": secret.not_after,
        "generation": secret.generation,
        "created_at": secret.created_at,
        "created_by": secret.created_by,
    }


def parse_pcrs(value: str) -> list[int]:
    try:
        pcrs = [int(p) for p in value.split(",") if p.strip()] if value else []
    except ValueError:
        raise click.BadParameter(f"{value!r}: give PCR numbers like 0,2,4,7") from None
    if any(not 0 <= p <= 23 for p in pcrs) or len(set(pcrs)) != len(pcrs):
        raise click.BadParameter("PCRs are 0 to 23, each once")
    return sorted(pcrs)


@click.group("unlock")
def unlock_group() -> None:
    """Disk-unlock secrets released to TPM-attested devices against a fresh quote.

    \b
    Administrator (the device enrolled with `kmsctl enroll --attest`):
      kmsctl key create unlock --type aes-256
      kmsctl unlock add router-1 --volume data --pcrs 0,7 --pcr-digest HEX \\
          --generate --secret-out data.key
      cryptsetup luksAddKey /dev/sdb2 data.key      # then shred data.key
      kmsctl unlock list
    Device, at boot:
      kmsctl unlock fetch --volume data --device-dir /etc/edgekms | \\
          cryptsetup open /dev/sdb2 data --key-file -
    """


_VOLUME = click.option("--volume", required=True, help="The volume's name (a-z 0-9 _ -).")


def _secret_bytes(generate: bool, from_file: Path | None, secret_out: Path | None) -> bytes:
    if generate == bool(from_file):
        raise click.UsageError("give exactly one of --generate and --from-file")
    if generate:
        if secret_out is None:
            raise click.UsageError("--generate needs --secret-out (the LUKS key slot needs it)")
        value = secrets.token_hex(32).encode()
        from mgmt.pki import write_private

        write_private(secret_out, value)
        return value
    assert from_file is not None
    value = from_file.read_bytes()
    if not 1 <= len(value) <= MAX_SECRET:
        raise click.BadParameter(f"a secret is 1 to {MAX_SECRET} bytes", param_hint="--from-file")
    return value


def _put(
    device: str,
    volume: str,
    secret: bytes,
    key: str,
    policy: dict[str, Any],
    replace: bool,
    data_dir: Path,
    config_path: Path | None,
) -> enroll_pb2.UnlockSecret:
    """Encrypt the secret under KMS key `key` (bound to device and volume), then store it
    with its policy; the plaintext goes to the broker only inside Encrypt."""
    from edgekms.unlockpolicy import secret_aad

    with open_client(data_dir, config_path) as kms:
        sealed = kms.encrypt(key, secret, aad=secret_aad(device, volume))
        record = enroll_pb2.UnlockSecret(
            device=device,
            volume=volume,
            ciphertext=sealed.ciphertext,
            key_name=sealed.key_name,
            key_version=sealed.key_version,
            **policy,
        )
        return kms.put_unlock_secret(record, replace=replace)


def _policy(pcrs: str, pcr_digest: str, not_before: str, not_after: str) -> dict[str, Any]:
    parsed = parse_pcrs(pcrs)
    try:
        digest = bytes.fromhex(pcr_digest) if pcr_digest else b""
    except ValueError:
        raise click.BadParameter("64 hex digits", param_hint="--pcr-digest") from None
    if digest and len(digest) != 32:
        raise click.BadParameter("64 hex digits", param_hint="--pcr-digest")
    return {
        "pcrs": parsed,
        "pcr_digest": digest,
        "not_before": not_before,
        "not_after": not_after,
    }


def _show(secret: enroll_pb2.UnlockSecret, output: str) -> None:
    shown = secret_to_dict(secret)
    if output == "json":
        echo_json(shown)
        return
    for name, value in shown.items():
        if value not in ("", [], 0):
            click.echo(f"{name + ':':<13} {value}")


_SECRET_OPTIONS = [
    click.option("--generate", is_flag=True, help="A fresh random secret (64 hex characters)."),
    click.option(
        "--from-file",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        default=None,
        help="The secret is this file's content (at most 4 KiB).",
    ),
    click.option(
        "--secret-out",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="With --generate: write the secret here (0600), for `cryptsetup luksAddKey`.",
    ),
]


def _secret_options(fn: Any) -> Any:
    for option in reversed(_SECRET_OPTIONS):
        fn = option(fn)
    return fn


@unlock_group.command("add")
@click.argument("device")
@_VOLUME
@_secret_options
@click.option("--key", default=DEFAULT_KEY, show_default=True, help="The KMS key (aes-256).")
@click.option("--pcrs", default="", help="sha256-bank PCRs the device must quote: 0,2,4,7.")
@click.option(
    "--pcr-digest",
    default="",
    help="Their expected digest (`kmsctl unlock pcrs` on the device). [default: from the "
    "PCR 0-7 values the device quoted at `kmsctl enroll --attest`]",
)
@click.option("--not-before", default="", help="Released from this time (RFC 3339) on.")
@click.option("--not-after", default="", help="Released until this time (RFC 3339).")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
@client_options
def add_cmd(
    device: str,
    volume: str,
    generate: bool,
    from_file: Path | None,
    secret_out: Path | None,
    key: str,
    pcrs: str,
    pcr_digest: str,
    not_before: str,
    not_after: str,
    output: str,
    data_dir: Path,
    config_path: Path | None,
) -> None:
    """Store a secret for DEVICE's volume, released only to that device's TPM (its EK,
    recorded at `kmsctl enroll --attest`) with the PCR values given, in the window given."""
    policy = _policy(pcrs, pcr_digest, not_before, not_after)
    value = _secret_bytes(generate, from_file, secret_out)
    stored = _put(device, volume, value, key, policy, False, data_dir, config_path)
    _show(stored, output)


@unlock_group.command("rotate")
@click.argument("device")
@_VOLUME
@_secret_options
@click.option("--key", default=DEFAULT_KEY, show_default=True, help="The KMS key (aes-256).")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
@client_options
def rotate_cmd(
    device: str,
    volume: str,
    generate: bool,
    from_file: Path | None,
    secret_out: Path | None,
    key: str,
    output: str,
    data_dir: Path,
    config_path: Path | None,
) -> None:
    """Replace the volume's secret (a new passphrase: add it to the LUKS header, then
    remove the old one), encrypted under the key's newest version; the policy is kept."""
    value = _secret_bytes(generate, from_file, secret_out)
    stored = _put(device, volume, value, key, {}, True, data_dir, config_path)
    _show(stored, output)


@unlock_group.command("list")
@click.argument("device", required=False, default="")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
@client_options
def list_cmd(device: str, output: str, data_dir: Path, config_path: Path | None) -> None:
    """Unlock secrets (their policies), of every device or of DEVICE."""
    with open_client(data_dir, config_path) as kms:
        found = [secret_to_dict(s) for s in kms.iter_unlock_secrets(device)]
    if output == "json":
        echo_json(found)
        return
    rows = [
        (s["device"], s["volume"], ",".join(map(str, s["pcrs"])) or "-", str(s["generation"]))
        for s in found
    ]
    click.echo(table(("DEVICE", "VOLUME", "PCRS", "GENERATION"), rows))


@unlock_group.command("show")
@click.argument("device")
@_VOLUME
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
@client_options
def show_cmd(
    device: str, volume: str, output: str, data_dir: Path, config_path: Path | None
) -> None:
    """One volume's policy (never its secret)."""
    with open_client(data_dir, config_path) as kms:
        _show(kms.get_unlock_secret(device, volume), output)


@unlock_group.command("remove")
@click.argument("device")
@_VOLUME
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
@client_options
def remove_cmd(
    device: str, volume: str, output: str, data_dir: Path, config_path: Path | None
) -> None:
    """Stop releasing the volume's secret (kept in the bucket as a removal record)."""
    with open_client(data_dir, config_path) as kms:
        _show(kms.remove_unlock_secret(device, volume), output)


_TCTI = click.option(
    "--tcti",
    default="device:/dev/tpmrm0",
    show_default=True,
    help="This device's TPM: a TCTI string or a device path.",
)


@unlock_group.command("fetch")
@_VOLUME
@click.option(
    "--device-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/etc/edgekms"),
    show_default=True,
    help="Where `kmsctl enroll --attest` wrote device.json (KMS address, CA fingerprint).",
)
@click.option("--server", default="", help="The KMS enrollment listener HOST:PORT.")
@click.option(
    "--mdns",
    is_flag=True,
    help="Find the KMS on the LAN (_edgekms._tcp, `kmsctl up --mdns`) instead of the address "
    "saved at enrollment; the CA fingerprint is still the saved one.",
)
@click.option(
    "--mdns-interface",
    "mdns_interfaces",
    multiple=True,
    metavar="IPV4",
    help="Look on this interface address only (repeatable). [default: all]",
)
@click.option("--fingerprint", default="", help="SHA-256 of the internal CA certificate.")
@click.option("--device", default="", help="This device's name.")
@_TCTI
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
    help="Write the secret here (0600, or a FIFO) instead of stdout.",
)
@handle_errors
def fetch_cmd(
    volume: str,
    device_dir: Path,
    server: str,
    mdns: bool,
    mdns_interfaces: tuple[str, ...],
    fingerprint: str,
    device: str,
    tcti: str,
    endorsement_auth_file: Path | None,
    out_path: Path | None,
) -> None:
    """On the device, at boot: get the volume's secret from the KMS, proven by a quote
    of this TPM, and print it for `cryptsetup --key-file -`. Exit 7 when refused (PCRs
    changed, denied, another TPM), 8 when the KMS cannot be reached."""
    from mgmt.cli.tpm import tcti_of
    from mgmt.unlock import fetch, target_from

    auth = endorsement_auth_file.read_bytes().rstrip(b"\n") if endorsement_auth_file else b""
    if mdns and not server:
        from edgekms.errors import Unavailable
        from mgmt.mdns import discover

        found = discover(interfaces=list(mdns_interfaces) or None)
        if not found:
            raise Unavailable("unlock.kms_not_found", "no _edgekms._tcp service answered")
        server = found[0].server
    target = target_from(device_dir, server, fingerprint, device)
    value = fetch(target, volume, tcti_of(tcti), endorsement_auth=auth)
    if out_path is None:
        sys.stdout.buffer.write(value)
        sys.stdout.buffer.flush()
        return
    import stat

    if out_path.exists() and stat.S_ISFIFO(out_path.stat().st_mode):
        with open(out_path, "wb") as pipe:
            pipe.write(value)
        return
    from mgmt.pki import write_private

    write_private(out_path, value)


@unlock_group.command("pcrs")
@click.option("--pcrs", required=True, help="sha256-bank PCRs: 0,2,4,7.")
@_TCTI
@handle_errors
def pcrs_cmd(pcrs: str, tcti: str) -> None:
    """On the device, in its known-good state: the digest of these PCRs, for
    `kmsctl unlock add --pcr-digest`."""
    from mgmt.cli.tpm import tcti_of
    from mgmt.tpmdevice import DeviceTpm

    with DeviceTpm(tcti_of(tcti)) as tpm:
        click.echo(tpm.pcr_digest(parse_pcrs(pcrs)).hex())


def register(cli: click.Group) -> None:
    cli.add_command(unlock_group)
