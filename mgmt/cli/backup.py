"""`kmsctl backup` and `kmsctl restore`: an encrypted copy of a stopped stack's data dir
(JetStream store, SoftHSM token, TPM blobs, configs and secrets) and its way back into a
new data dir. What is copied and why the stack must be stopped: mgmt.backup; the file
format: mgmt.backupfile."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from edgekms.errors import InvalidArgument
from mgmt.cli.common import data_dir_option, output_option
from mgmt.cli.output import echo_json, handle_errors

PASSPHRASE_ENV = "EDGEKMS_BACKUP_PASSPHRASE"  # noqa: S105 - a variable name, not a secret

_secret_options = [
    click.option(
        "--passphrase-file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Read the passphrase from this file (first line; `-` reads stdin). Else"
        f" ${PASSPHRASE_ENV}, else a prompt. Never on the command line.",
    ),
    click.option(
        "--key-file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Use a 32-byte key of your own instead of a passphrase (raw, hex or base64;"
        " `head -c 32 /dev/urandom > backup.key`).",
    ),
]


def _with_secret_options(fn: Any) -> Any:
    for option in reversed(_secret_options):
        fn = option(fn)
    return fn


def _read_first_line(path: Path) -> bytes:
    try:
        data = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(
            "backup.passphrase_unreadable", f"cannot read {path}: {exc.strerror}"
        ) from None
    return data.split(b"\n", 1)[0].rstrip(b"\r")


def secret_from(passphrase_file: Path | None, key_file: Path | None, confirm: bool) -> Any:
    """The operator's secret, from a file, the environment or a prompt; never argv. An
    empty one is refused here, before anything is locked, read or written."""
    from mgmt.backupfile import Secret, parse_key_file

    if passphrase_file is not None and key_file is not None:
        raise InvalidArgument(
            "backup.secret_ambiguous", "give --passphrase-file or --key-file, not both"
        )
    if key_file is not None:
        try:
            return Secret(key=parse_key_file(key_file.read_bytes()))
        except OSError as exc:
            raise InvalidArgument(
                "backup.key_invalid", f"cannot read {key_file}: {exc.strerror}"
            ) from None
    if passphrase_file is not None:
        return Secret(passphrase=_read_first_line(passphrase_file))
    env = os.environ.get(PASSPHRASE_ENV)
    if env is not None:
        return Secret(passphrase=env.encode())
    if not sys.stdin.isatty():
        raise InvalidArgument(
            "backup.passphrase_missing",
            f"no passphrase: give --passphrase-file, --key-file or ${PASSPHRASE_ENV}"
            " (or run on a terminal to be asked)",
        )
    text = click.prompt(
        "Backup passphrase",
        hide_input=True,
        confirmation_prompt=confirm,
        default="",
        show_default=False,
    )
    return Secret(passphrase=str(text).encode())


class _Meter:
    """Progress on stderr for people: a percentage line at most 4 times a second on a
    terminal, a line every 10 % otherwise; nothing with -o json."""

    def __init__(self, verb: str, enabled: bool) -> None:
        self.verb = verb
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.last_tenth = -1

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        pct = 100 * done // total if total else 100
        if self.tty:
            now = time.monotonic()
            if now - self.last >= 0.25 or done >= total:
                self.last = now
                sys.stderr.write(f"\r{self.verb}: {done / 2**20:8.1f} MiB {pct:3d} %")
                sys.stderr.flush()
        elif pct // 10 > self.last_tenth:
            self.last_tenth = pct // 10
            click.echo(f"{self.verb}: {done / 2**20:.1f} MiB ({pct} %)", err=True)

    def end(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


@click.command("backup")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(path_type=Path),
    help="The backup file to write (written beside, renamed when complete, 0600).",
)
@_with_secret_options
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@output_option
@data_dir_option
@handle_errors
def backup_cmd(
    out: Path,
    passphrase_file: Path | None,
    key_file: Path | None,
    force: bool,
    output: str,
    data_dir: Path,
) -> None:
    """Write an encrypted backup of a stopped stack's data dir.

    \b
      kmsctl backup --out kms.backup --passphrase-file pass.txt
      kmsctl restore kms.backup --data-dir /srv/kms-new --passphrase-file pass.txt

    It holds the JetStream store (every key record, the CA's state, every audit stream),
    the SoftHSM token's objects, the TPM key blobs, configs and secrets: scrypt and
    AES-256-GCM in chunks, so a large store streams. The stack must be stopped (exit 6,
    backup.stack_running, names the pid of a running `kmsctl up`): the copy is then one
    instant's state. TPM keys restore only onto the TPM that made them.
    """
    from mgmt.backup import check_out, create_backup

    secret = secret_from(passphrase_file, key_file, confirm=True)
    check_out(out, force)
    meter = _Meter("backing up", output == "text")
    result = create_backup(data_dir, out, secret, force=force, progress=meter)
    meter.end()
    summary = {
        "out": str(result.out),
        "size": result.size,
        **result.manifest.to_dict(),
    }
    if output == "json":
        echo_json(summary)
        return
    m = result.manifest
    click.echo(
        f"backed up {m.source} to {result.out} ({result.size / 2**20:.1f} MiB, {m.files} files,"
        f" {len(m.streams)} streams)"
    )
    if any(m.tpm_keys.values()):
        keys = ", ".join(f"{p}: {n}" for p, n in m.tpm_keys.items())
        click.echo(f"note: TPM keys ({keys}) are restorable only on this TPM.")


@click.command("restore")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@_with_secret_options
@click.option(
    "--force",
    is_flag=True,
    help="Replace a data dir that is not empty (never one a `kmsctl up` runs on).",
)
@click.option(
    "--check",
    is_flag=True,
    help="Only verify the file (passphrase, every chunk, the archive); write nothing.",
)
@output_option
@data_dir_option
@handle_errors
def restore_cmd(
    file: Path,
    passphrase_file: Path | None,
    key_file: Path | None,
    force: bool,
    check: bool,
    output: str,
    data_dir: Path,
) -> None:
    """Restore a backup into a new data dir, then start it with `kmsctl up --data-dir`.

    \b
      kmsctl restore kms.backup --data-dir /srv/kms-new --passphrase-file pass.txt
      kmsctl up --data-dir /srv/kms-new

    The whole file is authenticated before a byte is written: a wrong passphrase (exit 7,
    backup.wrong_key), a damaged or cut file (exit 3, backup.corrupt / backup.truncated)
    or one from a newer EdgeKMS (exit 6, backup.version_unsupported) leaves nothing
    behind. A data dir that is not empty is refused (exit 5) unless --force.
    The same keys, CA (serials go on, none reused) and audit chain come back; TPM keys
    work only on the TPM they were made on: elsewhere they are listed but refuse to sign
    (tpm.blob_rejected).
    """
    from mgmt.backup import TPM_WARNING, check_target, restore_backup, verify_backup

    secret = secret_from(passphrase_file, key_file, confirm=False)
    meter = _Meter("checking" if check else "restoring", output == "text")
    if check:
        manifest = verify_backup(file, secret, progress=meter)
        meter.end()
        if output == "json":
            echo_json({"file": str(file), "verified": True, **manifest.to_dict()})
        else:
            click.echo(f"{file}: intact, made {manifest.created} from {manifest.source}")
        return
    check_target(data_dir, force)
    result = restore_backup(file, data_dir, secret, force=force, progress=meter)
    meter.end()
    m = result.manifest
    tpm_keys = {p: n for p, n in m.tpm_keys.items() if n}
    if output == "json":
        echo_json(
            {
                "file": str(file),
                "data_dir": str(result.data_dir),
                "replaced": result.replaced,
                "tpm_warning": TPM_WARNING if tpm_keys else "",
                **m.to_dict(),
            }
        )
        return
    click.echo(
        f"restored {file} (made {m.created} on {m.hostname} from {m.source}) into"
        f" {result.data_dir}: {m.files} files, {len(m.streams)} streams"
    )
    if tpm_keys:
        keys = ", ".join(f"{p}: {n}" for p, n in tpm_keys.items())
        click.echo(f"warning: {keys} key(s). {TPM_WARNING}", err=True)
    click.echo(f"start it with: kmsctl up --data-dir {result.data_dir}")


def register(cli: click.Group) -> None:
    cli.add_command(backup_cmd)
    cli.add_command(restore_cmd)
