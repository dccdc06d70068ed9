"""`kmsctl key ...`: create, inspect, use and retire keys through the broker.

Every command dials the broker with the client config `kmsctl init` wrote (mutual TLS),
so what an administrator can do here is exactly what the broker lets that certificate do.
Files are hashed here and only the digest travels (Ed25519 excepted: it signs the message).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click

from edgekms.algorithms import (
    ALGORITHM_BY_CLI,
    KEY_TYPE_BY_CLI,
    MAX_AAD,
    MAX_MESSAGE_SIZE,
    MAX_PLAINTEXT,
    AlgorithmInfo,
    KeyType,
    key_type_info,
)
from edgekms.envelope import MALFORMED, MAX_ENVELOPE
from edgekms.errors import FailedPrecondition, InvalidArgument, KMSError
from edgekms.v1.common_pb2 import KEY_USAGE_ENCRYPT_DECRYPT, KEY_USAGE_SIGN_VERIFY, KeyOptions
from mgmt.cli.client_access import client_options, open_client, write_output
from mgmt.cli.common import ExitCode, output_option
from mgmt.cli.completion import complete_key_names
from mgmt.cli.output import (
    algorithm_name,
    echo_json,
    encryption_algorithm_name,
    error_line,
    exit_code_for,
    key_details,
    key_table,
    key_to_dict,
    key_type_name,
    progress,
)

if TYPE_CHECKING:
    from mgmt.client import KMSClient

# mgmt.client (grpc) and cryptography load inside the commands that call the broker or
# hash, not with this module: click imports it to complete a key name on every TAB
# (mgmt/cli/completion.py), and `kmsctl key --help` needs neither.

# Key types whose generation takes long enough that a silent terminal looks hung
# (and every key on a TPM provider, which is slow at everything).
_SLOW_TYPES = {"rsa-2048", "rsa-3072", "rsa-4096"}
_CHUNK = 1 << 16

# The scheme kmsctl signs with when not told: SHA-256 for every hashed family, so that
# `openssl dgst -sha256 -verify pub.pem -signature SIG FILE` works for any key.
_CLI_DEFAULT_ALGORITHM = {"ec": "ecdsa-sha256", "rsa": "rsa-pkcs1-sha256", "ed25519": "ed25519"}


def default_algorithm_for(key_type: KeyType) -> AlgorithmInfo:
    """kmsctl's default scheme for a key type (SHA-256 based, unlike the API's default)."""
    return ALGORITHM_BY_CLI[_CLI_DEFAULT_ALGORITHM[key_type_info(key_type).family]]


def parse_labels(values: tuple[str, ...]) -> dict[str, str]:
    """`k=v` pairs into a dict; a repeated key or a missing `=` is a usage error."""
    labels: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not k=v", param_hint="--label")
        if key in labels:
            raise click.BadParameter(f"label {key!r} given twice", param_hint="--label")
        labels[key] = value
    return labels


def _wire_data(ainfo: AlgorithmInfo, stream: IO[bytes]) -> bytes:
    """Digest of the stream (read in chunks, any size) or, for Ed25519, the bounded message."""
    if ainfo.hash_name is None:
        message = stream.read(MAX_MESSAGE_SIZE + 1)
        if len(message) > MAX_MESSAGE_SIZE:
            raise InvalidArgument(
                "sign.message_too_large",
                f"{ainfo.cli_name} signs the message itself; at most {MAX_MESSAGE_SIZE} bytes",
            )
        return bytes(message)
    # hashlib (OpenSSL's digests, like cryptography's) keeps cryptography's import, a
    # sixth of a `key sign`, off the path (docs/performance.md, "kmsctl start-up").
    h = hashlib.new(ainfo.hash_name)
    while chunk := stream.read(_CHUNK):
        h.update(chunk)
    return h.digest()


def _algorithm(kms: KMSClient, name: str, algorithm: str | None) -> AlgorithmInfo:
    if algorithm is not None:
        from mgmt.client import resolve_algorithm

        return resolve_algorithm(algorithm)
    return default_algorithm_for(kms.key_type(name))


algorithm_option = click.option(
    "--algorithm",
    "-a",
    type=click.Choice(sorted(ALGORITHM_BY_CLI)),
    default=None,
    metavar="ALG",
    help="Signature scheme, one of " + ", ".join(sorted(ALGORITHM_BY_CLI)) + ".  "
    "[default: the key family's SHA-256 scheme; ed25519 for ed25519 keys]",
)


@click.group("key")
def key_group() -> None:
    """Create, inspect, use and retire keys. The private half never leaves its token.

    \b
    Examples:
      kmsctl key create web --type ec-p256 --label env=prod
      kmsctl key list --prefix nas/
      kmsctl key sign web --in release.tar --out release.sig
      kmsctl key pubkey web --out web.pem
      openssl dgst -sha256 -verify web.pem -signature release.sig release.tar
      kmsctl key create disks --type aes-256
      kmsctl key encrypt disks --in secret.txt --out secret.ekms --aad volume=data
      kmsctl key decrypt --in secret.ekms --out - --aad volume=data
    """


@key_group.command("create")
@click.argument("name")
@click.option(
    "--type",
    "key_type",
    required=True,
    type=click.Choice(list(KEY_TYPE_BY_CLI)),
    help="Key type. Which ones a provider holds is up to the provider.",
)
@click.option("--provider", default="", help="Provider id (hsm0, tpm0). [default: the broker's]")
@click.option("--label", "labels", multiple=True, metavar="K=V", help="A label; repeatable.")
@click.option(
    "--usage",
    type=click.Choice(["sign", "encrypt"]),
    default=None,
    help="What the key is for, fixed for its life: rsa-* keys sign unless made for "
    "encrypt (RSA-OAEP); aes-256 keys only encrypt; ec and ed25519 keys only sign.",
)
@output_option
@client_options
def create_cmd(
    name: str,
    key_type: str,
    provider: str,
    labels: tuple[str, ...],
    usage: str | None,
    output: str,
    data_dir: Path,
    config_path: Path | None,
) -> None:
    """Generate key NAME inside a provider.

    \b
    Names are [a-z0-9] segments joined by / - _ or . (at most 128 characters).
    RSA keys take seconds to generate; progress shows on stderr.

    \b
    Examples:
      kmsctl key create web --type ec-p256
      kmsctl key create ca/root --type rsa-4096 --provider hsm0 --label role=ca
      kmsctl key create disks --type aes-256
      kmsctl key create backup/wrap --type rsa-3072 --usage encrypt
    """
    from mgmt.client import CREATE_TIMEOUT

    label_map = parse_labels(labels)
    options = None
    if usage is not None:
        options = KeyOptions(
            usage=KEY_USAGE_ENCRYPT_DECRYPT if usage == "encrypt" else KEY_USAGE_SIGN_VERIFY
        )
    with open_client(data_dir, config_path, timeout=CREATE_TIMEOUT) as kms:
        where = f" in {provider}" if provider else ""
        if key_type in _SLOW_TYPES or provider.startswith("tpm"):
            with progress(f"generating {key_type} key {name}{where}"):
                key = kms.create_key(
                    name, key_type, provider=provider, labels=label_map, options=options
                )
        else:
            key = kms.create_key(
                name, key_type, provider=provider, labels=label_map, options=options
            )
    if output == "json":
        echo_json(key_to_dict(key))
    else:
        click.echo(f"created {key.name} ({key_type_name(key.key_type)}) in {key.provider}")


@key_group.command("list")
@click.option("--prefix", default="", help="Only keys whose name starts with this.")
@click.option("--all", "include_destroyed", is_flag=True, help="Include destroyed keys.")
@output_option
@client_options
def list_cmd(
    prefix: str, include_destroyed: bool, output: str, data_dir: Path, config_path: Path | None
) -> None:
    """List keys, sorted by name.

    \b
    Examples:
      kmsctl key list
      kmsctl key list --prefix ca/ --all -o json
    """
    with open_client(data_dir, config_path) as kms:
        keys = sorted(kms.list_keys(prefix, include_destroyed), key=lambda k: k.name)
    if output == "json":
        echo_json([key_to_dict(k) for k in keys])
    elif keys:
        click.echo(key_table(keys))
    else:
        click.echo("no keys", err=True)


@key_group.command("show")
@click.argument("name", shell_complete=complete_key_names)
@output_option
@client_options
def show_cmd(name: str, output: str, data_dir: Path, config_path: Path | None) -> None:
    """Show key NAME's record: type, provider, state, labels, policy.

    \b
    Example:
      kmsctl key show web -o json
    """
    with open_client(data_dir, config_path) as kms:
        key = kms.get_key(name)
    if output == "json":
        echo_json(key_to_dict(key))
    else:
        click.echo(key_details(key))


def _state_command(verb: str, doc: str) -> None:
    @key_group.command(verb, help=doc)
    @click.argument("name", shell_complete=complete_key_names)
    @output_option
    @client_options
    def cmd(name: str, output: str, data_dir: Path, config_path: Path | None) -> None:
        with open_client(data_dir, config_path) as kms:
            key = getattr(kms, f"{verb}_key")(name)
        if output == "json":
            echo_json(key_to_dict(key))
        else:
            click.echo(f"{key.name}: {key_to_dict(key)['state']}")


_state_command(
    "disable",
    """Disable key NAME: every use is refused until it is enabled again.

    \b
    Example:
      kmsctl key disable web
    """,
)
_state_command(
    "enable",
    """Enable key NAME again after `kmsctl key disable`.

    \b
    Example:
      kmsctl key enable web
    """,
)


@key_group.command("destroy")
@click.argument("name", shell_complete=complete_key_names)
@click.option("--yes", "-y", is_flag=True, help="Do not ask; needed when stdin is not a terminal.")
@output_option
@client_options
def destroy_cmd(
    name: str, yes: bool, output: str, data_dir: Path, config_path: Path | None
) -> None:
    """Destroy key NAME for good: the token erases it; the record stays as destroyed.

    Nothing signed by it can be signed again. Asks for confirmation unless --yes.

    \b
    Example:
      kmsctl key destroy old/web --yes
    """
    if not yes:
        if not sys.stdin.isatty():
            click.echo(
                f"kmsctl: destroy.confirmation_required: refusing to destroy {name} without "
                "a terminal to confirm on; pass --yes",
                err=True,
            )
            sys.exit(int(ExitCode.USAGE))
        click.confirm(f"Destroy key {name}? This cannot be undone", abort=True, err=True)
    with open_client(data_dir, config_path) as kms:
        key = kms.destroy_key(name)
    if output == "json":
        echo_json(key_to_dict(key))
    else:
        click.echo(f"{key.name}: {key_to_dict(key)['state']}")


@key_group.command("pubkey")
@click.argument("name", shell_complete=complete_key_names)
@click.option("--out", "out", default="-", metavar="FILE", help="Write the PEM here. [default: -]")
@output_option
@client_options
def pubkey_cmd(name: str, out: str, output: str, data_dir: Path, config_path: Path | None) -> None:
    """Print key NAME's public key (PEM SubjectPublicKeyInfo).

    \b
    Examples:
      kmsctl key pubkey web --out web.pem
      kmsctl key pubkey web | openssl pkey -pubin -noout -text
    """
    with open_client(data_dir, config_path) as kms:
        public = kms.get_public_key(name)
    pem = public.pem
    if output == "json":
        if out != "-":
            write_output(out, pem.encode())
        echo_json({"name": public.name, "type": key_type_name(public.key_type), "pem": pem})
    else:
        write_output(out, pem.encode())


@key_group.command("sign")
@click.argument("name", shell_complete=complete_key_names)
@click.option(
    "--in",
    "infiles",
    required=True,
    multiple=True,
    type=click.File("rb"),
    help="File to sign; - is stdin. Repeat for many files (signed in one SignBatch call).",
)
@click.option("--out", "out", default=None, metavar="SIG", help="Signature file; - is stdout.")
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="With many --in files: write each signature to DIR/<file name>.sig.",
)
@algorithm_option
@output_option
@client_options
def sign_cmd(
    name: str,
    infiles: tuple[IO[bytes], ...],
    out: str | None,
    out_dir: Path | None,
    algorithm: str | None,
    output: str,
    data_dir: Path,
    config_path: Path | None,
) -> None:
    """Sign a file with key NAME; the file is hashed here, only its digest travels.

    ECDSA signatures are DER, RSA ones raw, as openssl expects them. Many files (--in
    repeated, with --out-dir) go to the KMS as one batch: each is still authorised and
    audited as its own signature. If some are refused, the others are still written, each
    refusal is reported, and the exit code is the first refusal's.

    \b
    Examples:
      kmsctl key sign web --in release.tar --out release.sig
      openssl dgst -sha256 -verify web.pem -signature release.sig release.tar
      tar c dir | kmsctl key sign web --in - --out dir.sig --algorithm ecdsa-sha384
      kmsctl key sign web --in a.bin --in b.bin --out-dir sigs
    """
    if len(infiles) == 1 and out_dir is None:
        if out is None:
            raise click.UsageError("give --out SIG (or --out-dir DIR)")
        _sign_one(name, infiles[0], out, algorithm, output, data_dir, config_path)
        return
    if out is not None or out_dir is None:
        raise click.UsageError("many --in files take --out-dir DIR, not --out")
    if any(f.name == "<stdin>" for f in infiles):
        raise click.UsageError("--in - (stdin) signs one file only")
    targets = [out_dir / f"{Path(f.name).name}.sig" for f in infiles]
    if len(set(targets)) != len(targets):
        raise click.UsageError("two --in files have the same name: their signatures would clash")
    with open_client(data_dir, config_path) as kms:
        ainfo = _algorithm(kms, name, algorithm)
        digests = [_wire_data(ainfo, f) for f in infiles]
        results = kms.sign_digests([(name, ainfo.algorithm, d) for d in digests])
    out_dir.mkdir(parents=True, exist_ok=True)
    report = []
    first_error: KMSError | None = None
    for infile, target, result in zip(infiles, targets, results, strict=True):
        if isinstance(result, KMSError):
            first_error = first_error or result
            report.append({"in": infile.name, "error": result.reason, "message": result.message})
            if output != "json":
                click.echo(f"{infile.name}: {error_line(result)}", err=True)
            continue
        write_output(str(target), result)
        report.append(
            {
                "in": infile.name,
                "out": str(target),
                "signature": base64.b64encode(result).decode(),
            }
        )
    if output == "json":
        echo_json({"name": name, "algorithm": algorithm_name(ainfo.algorithm), "results": report})
    else:
        signed = sum(1 for r in report if "out" in r)
        click.echo(f"signed {signed} of {len(report)} files with {name} -> {out_dir}", err=True)
    if first_error is not None:
        sys.exit(int(exit_code_for(first_error)))


def _sign_one(
    name: str,
    infile: IO[bytes],
    out: str,
    algorithm: str | None,
    output: str,
    data_dir: Path,
    config_path: Path | None,
) -> None:
    with open_client(data_dir, config_path) as kms:
        ainfo = _algorithm(kms, name, algorithm)
        signature = kms.sign_digest(name, ainfo.algorithm, _wire_data(ainfo, infile))
    write_output(out, signature)
    if output == "json":
        echo_json(
            {
                "name": name,
                "algorithm": algorithm_name(ainfo.algorithm),
                "signature": base64.b64encode(signature).decode(),
                "out": out,
            }
        )
    elif out != "-":
        click.echo(f"signed with {name} ({ainfo.cli_name}) -> {out}", err=True)


@key_group.command("verify")
@click.argument("name", shell_complete=complete_key_names)
@click.option(
    "--in", "infile", required=True, type=click.File("rb"), help="Signed file; - is stdin."
)
@click.option("--sig", "sigfile", required=True, type=click.File("rb"), help="Signature file.")
@algorithm_option
@output_option
@client_options
def verify_cmd(
    name: str,
    infile: IO[bytes],
    sigfile: IO[bytes],
    algorithm: str | None,
    output: str,
    data_dir: Path,
    config_path: Path | None,
) -> None:
    """Check a signature made by key NAME. Exit 0 if valid, 1 if not.

    \b
    Example:
      kmsctl key verify web --in release.tar --sig release.sig && echo good
    """
    signature = sigfile.read()
    with open_client(data_dir, config_path) as kms:
        ainfo = _algorithm(kms, name, algorithm)
        valid = kms.verify(
            name,
            _wire_data(ainfo, infile),
            signature,
            algorithm=ainfo.algorithm,
            prehashed=ainfo.hash_name is not None,
        )
    if output == "json":
        echo_json({"name": name, "algorithm": ainfo.cli_name, "valid": valid})
    else:
        click.echo("valid" if valid else "invalid")
    if not valid:
        sys.exit(int(ExitCode.FAILURE))


def _load_public_key_der(path: Path) -> bytes:
    """A pinned public key file, PEM or DER SubjectPublicKeyInfo, as DER."""
    # Here, not at the top: serialization costs key list and key sign ~50 ms of imports.
    from cryptography.hazmat.primitives import serialization

    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(
            "attest.ak_unreadable", f"cannot read {path}: {exc.strerror}"
        ) from None
    try:
        public = (
            serialization.load_pem_public_key(raw)
            if raw.lstrip().startswith(b"-----")
            else serialization.load_der_public_key(raw)
        )
    except ValueError:
        raise InvalidArgument(
            "attest.ak_invalid", f"{path} holds no PEM or DER public key"
        ) from None
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _pem(der: bytes) -> str:
    from cryptography.hazmat.primitives import serialization

    return (
        serialization.load_der_public_key(der)
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@key_group.command("attest")
@click.argument("name", shell_complete=complete_key_names)
@click.option(
    "--ak",
    "ak_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The TPM's attestation key (PEM/DER public key) pinned at enrollment. Without it "
    "the evidence is checked against the AK the KMS reports, which proves nothing about "
    "WHICH TPM holds the key.",
)
@click.option(
    "--save-ak",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the reported AK (PEM) here, to pin it with --ak next time.",
)
@output_option
@client_options
def attest_cmd(
    name: str,
    ak_file: Path | None,
    save_ak: Path | None,
    output: str,
    data_dir: Path,
    config_path: Path | None,
) -> None:
    """Prove that TPM key NAME lives in its TPM (TPM2_Certify evidence).

    A fresh random nonce goes to the TPM; its attestation key signs a statement about
    the key, and this command checks it here: signature, nonce, key attributes
    (fixedTPM, fixedParent, sensitiveDataOrigin) and that it is the registry's key.
    Any failed check exits 6 with an attest.* reason.

    \b
    Examples:
      kmsctl key attest device/id --save-ak tpm0-ak.pem      first time: pin the AK
      kmsctl key attest device/id --ak tpm0-ak.pem -o json
    """
    from mgmt.attestation import verify_certify

    expected_ak = _load_public_key_der(ak_file) if ak_file is not None else None
    nonce = secrets.token_bytes(32)
    with open_client(data_dir, config_path) as kms:
        evidence = kms.attest_key(name, nonce)
    if evidence.format != "tpm2":
        raise FailedPrecondition(
            "attest.format_unknown", f"cannot check evidence of format {evidence.format!r}"
        )
    verify_certify(
        attestation=evidence.attestation,
        signature=evidence.signature,
        signature_algorithm=evidence.signature_algorithm,
        attestation_key_der=evidence.attestation_key_der,
        key_public_area=evidence.key_public_area,
        nonce=nonce,
        expected_public_key_der=evidence.public_key_der,
        expected_ak_der=expected_ak or evidence.attestation_key_der,
    )
    ak_pem = _pem(evidence.attestation_key_der)
    if save_ak is not None:
        write_output(str(save_ak), ak_pem.encode())
    if output == "json":
        echo_json(
            {
                "name": name,
                "format": evidence.format,
                "verified": True,
                "ak_pinned": expected_ak is not None,
                "nonce": nonce.hex(),
                "ak_pem": ak_pem,
            }
        )
    else:
        click.echo(f"{name}: attested by the TPM (nonce {nonce.hex()[:16]}...)")
    if expected_ak is None:
        click.echo(
            "kmsctl: warning: the attestation key is not pinned; pass --ak FILE to check "
            "that this is the TPM you enrolled",
            err=True,
        )


def register(cli: click.Group) -> None:
    cli.add_command(key_group)


__all__ = [
    "default_algorithm_for",
    "key_group",
    "parse_labels",
    "register",
    "write_output",
]


# Encryption input is bounded (the broker takes at most MAX_PLAINTEXT bytes): read one
# byte more to tell "too large" from "exactly the limit".
def _read_bounded(stream: IO[bytes], limit: int, reason: str, what: str) -> bytes:
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise InvalidArgument(
            reason,
            f"{what} is limited to {limit} bytes; for more, encrypt a data key "
            "(GenerateDataKey) and the data with it",
            {"max_bytes": str(limit)},
        )
    return bytes(data)


def _aad(aad: str | None, aad_file: IO[bytes] | None) -> bytes:
    if aad is not None and aad_file is not None:
        raise click.UsageError("give --aad or --aad-file, not both")
    if aad_file is not None:
        return _read_bounded(aad_file, MAX_AAD, "encrypt.aad_too_large", "AAD")
    return (aad or "").encode()


aad_options = [
    click.option(
        "--aad",
        default=None,
        metavar="TEXT",
        help="Additional authenticated data: not stored, required again byte for byte "
        "to decrypt (a volume name, a device id).",
    ),
    click.option(
        "--aad-file",
        type=click.File("rb"),
        default=None,
        help="As --aad, read from a file (binary AAD).",
    ),
]


def _with_aad(fn: Any) -> Any:
    for option in reversed(aad_options):
        fn = option(fn)
    return fn


@key_group.command("encrypt")
@click.argument("name", shell_complete=complete_key_names)
@click.option(
    "--in", "infile", default="-", type=click.File("rb"), help="Plaintext; - is stdin. [default: -]"
)
@click.option(
    "--out",
    "out",
    default=None,
    metavar="FILE",
    help="Ciphertext file; - is stdout. [default: stdout; with -o json, only the json]",
)
@_with_aad
@output_option
@client_options
def encrypt_cmd(
    name: str,
    infile: IO[bytes],
    out: str | None,
    aad: str | None,
    aad_file: IO[bytes] | None,
    output: str,
    data_dir: Path,
    config_path: Path | None,
) -> None:
    """Encrypt at most 64 KiB with key NAME (aes-256, or an rsa key made --usage encrypt).

    \b
    The ciphertext names its key and key version, so `kmsctl key decrypt` needs no key
    name, and it still decrypts after `kmsctl key rotate`. -o json prints it base64.

    \b
    Examples:
      kmsctl key encrypt disks --in passphrase.txt --out passphrase.ekms
      echo -n hunter2 | kmsctl key encrypt disks --aad volume=data -o json
    """
    plaintext = _read_bounded(infile, MAX_PLAINTEXT, "encrypt.plaintext_too_large", "the plaintext")
    with open_client(data_dir, config_path) as kms:
        sealed = kms.encrypt(name, plaintext, _aad(aad, aad_file))
    if out is not None or output != "json":
        write_output(out or "-", sealed.ciphertext)
    if output == "json":
        echo_json(
            {
                "name": sealed.key_name,
                "version": sealed.key_version,
                "algorithm": encryption_algorithm_name(sealed.algorithm),
                "ciphertext": base64.b64encode(sealed.ciphertext).decode(),
                "out": out,
            }
        )
    elif out not in (None, "-"):
        click.echo(f"encrypted with {sealed.key_name} v{sealed.key_version} -> {out}", err=True)


@key_group.command("decrypt")
@click.option(
    "--in",
    "infile",
    default="-",
    type=click.File("rb"),
    help="Ciphertext from `key encrypt`; - is stdin. [default: -]",
)
@click.option(
    "--base64",
    "base64_in",
    is_flag=True,
    help="The input is base64 (the `ciphertext` of `key encrypt -o json`).",
)
@click.option(
    "--out",
    "out",
    default=None,
    metavar="FILE",
    help="Plaintext file; - is stdout. [default: stdout; with -o json, only the json]",
)
@click.option(
    "--key",
    "name",
    default="",
    metavar="NAME",
    help="Refuse a ciphertext made by any other key (decrypt.key_mismatch).",
)
@_with_aad
@output_option
@client_options
def decrypt_cmd(
    infile: IO[bytes],
    base64_in: bool,
    out: str | None,
    name: str,
    aad: str | None,
    aad_file: IO[bytes] | None,
    output: str,
    data_dir: Path,
    config_path: Path | None,
) -> None:
    """Decrypt a ciphertext made by `kmsctl key encrypt` (the key is named inside it).

    \b
    The same --aad as at encryption is required. A ciphertext that was changed, made
    for other AAD, or made by a destroyed key is refused (exit 2, decrypt.failed).

    \b
    Examples:
      kmsctl key decrypt --in passphrase.ekms --out - | cryptsetup open --key-file - ...
      kmsctl key decrypt --in secret.b64 --base64 --aad volume=data -o json
    """
    raw = _read_bounded(infile, MAX_ENVELOPE * 2, MALFORMED, "a ciphertext")
    if base64_in:
        try:
            raw = base64.b64decode(raw.strip(), validate=True)
        except ValueError:
            raise InvalidArgument(MALFORMED, "the input is not base64") from None
    with open_client(data_dir, config_path) as kms:
        opened = kms.decrypt_full(raw, _aad(aad, aad_file), name)
    if out is not None or output != "json":
        write_output(out or "-", opened.plaintext)
    if output == "json":
        echo_json(
            {
                "name": opened.key_name,
                "version": opened.key_version,
                "plaintext": base64.b64encode(opened.plaintext).decode(),
                "out": out,
            }
        )


@key_group.command("rotate")
@click.argument("name", shell_complete=complete_key_names)
@output_option
@client_options
def rotate_cmd(name: str, output: str, data_dir: Path, config_path: Path | None) -> None:
    """Make a new version of encryption key NAME in its provider.

    \b
    New ciphertexts use the new version; older ones keep decrypting with theirs (each
    names its version). Signing keys are not rotated in place: their public key is in
    certificates. Destroying the key destroys every version.

    \b
    Example:
      kmsctl key rotate disks
    """
    from mgmt.client import CREATE_TIMEOUT

    with (
        open_client(data_dir, config_path, timeout=CREATE_TIMEOUT) as kms,
        progress(f"making a new version of {name}"),
    ):
        key = kms.rotate_key(name)
    if output == "json":
        echo_json(key_to_dict(key))
    else:
        click.echo(f"{key.name}: now version {key.version or 1}")
