"""A PKCS#11 token that exists already, for `kmsctl up --pkcs11-module ...`.

`kmsctl up` normally makes a SoftHSM token of its own. A board has none: its token is
OP-TEE's PKCS#11 TA (libckteec), initialised once by the board's provisioning, which
also stores the user PIN in a root-only file. `ExternalToken` names that token (module,
label, PIN file) so the stack's crypto service uses it instead; `check_external` refuses
a bad one before anything starts or is written. The PIN is never read here, only the
file's kind, owner and mode, so it cannot reach a log or a command line: the crypto
service reads it itself (crypto_service.config). The data dir remembers the token's
label (`config/pkcs11-token.json`), so a later start on another token, or on none, is
refused rather than left with every key missing.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from edgekms.errors import FailedPrecondition, InvalidArgument

OPTIONS = ("--pkcs11-module", "--pkcs11-token-label", "--pkcs11-pin-file")
# PKCS#11 token labels are 32 bytes, blank padded (CK_TOKEN_INFO.label).
MAX_LABEL_BYTES = 32


@dataclass(frozen=True)
class ExternalToken:
    """The token the crypto service opens: its PKCS#11 module, its label, and the file
    holding its user PIN (0600, this user's)."""

    module: Path
    label: str
    pin_file: Path


def check_external(
    module: Path | None, label: str | None, pin_file: Path | None
) -> ExternalToken | None:
    """The token given by the three options, or None when none is given; all three or
    none, the module a file that exists, the label a PKCS#11 label, the PIN file a
    non-empty regular file only this user may read: InvalidArgument otherwise."""
    given = [module is not None, bool(label), pin_file is not None]
    if not any(given):
        return None
    if not all(given):
        missing = [name for name, ok in zip(OPTIONS, given, strict=True) if not ok]
        raise InvalidArgument(
            "pkcs11.options_incomplete",
            f"an existing token needs {', '.join(OPTIONS)} together; missing: "
            + ", ".join(missing),
            {"missing": ",".join(missing)},
        )
    assert module is not None and label is not None and pin_file is not None
    module = module.expanduser().absolute()
    if not module.is_file():
        raise InvalidArgument(
            "pkcs11.module_missing",
            f"--pkcs11-module {module}: no such file (OP-TEE's is /usr/lib/libckteec.so.0)",
            {"module": str(module)},
        )
    encoded = label.encode()
    if len(encoded) > MAX_LABEL_BYTES or label != label.strip() or not label.isprintable():
        raise InvalidArgument(
            "pkcs11.label_invalid",
            f"--pkcs11-token-label: at most {MAX_LABEL_BYTES} bytes of printable text, "
            "no leading or trailing blanks",
            {"length": str(len(encoded))},
        )
    return ExternalToken(module=module, label=label, pin_file=_check_pin_file(pin_file))


def _in_credentials(pin_file: Path) -> bool:
    """Whether `pin_file` is one of this unit's systemd credentials (LoadCredential=,
    `%d/NAME`): systemd gives that directory to this service alone (a private mount,
    the service's user let in by an ACL on a root-owned 0400 file), so owner and mode
    say nothing there."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY", "")
    if not directory:
        return False
    return Path(directory).absolute() in pin_file.parents


def _check_pin_file(pin_file: Path) -> Path:
    """A regular, non-empty file owned by this user with no group or other access (or a
    systemd credential of this service): a PIN others may read is a PIN others have."""
    pin_file = pin_file.expanduser().absolute()
    try:
        info = os.stat(pin_file)
    except OSError as exc:
        raise InvalidArgument(
            "pkcs11.pin_file_missing",
            f"--pkcs11-pin-file {pin_file}: {exc.strerror or exc}",
            {"pin_file": str(pin_file)},
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise InvalidArgument(
            "pkcs11.pin_file_missing",
            f"--pkcs11-pin-file {pin_file}: not a regular file",
            {"pin_file": str(pin_file)},
        )
    mode = stat.S_IMODE(info.st_mode)
    if (mode & 0o077 or info.st_uid != os.geteuid()) and not _in_credentials(pin_file):
        raise InvalidArgument(
            "pkcs11.pin_file_open",
            f"--pkcs11-pin-file {pin_file}: mode {mode:04o}, owner uid {info.st_uid}: it must "
            f"be this user's (uid {os.geteuid()}) and 0600 (chmod 600)",
            {"pin_file": str(pin_file), "mode": f"{mode:04o}", "uid": str(info.st_uid)},
        )
    if info.st_size == 0:
        raise InvalidArgument(
            "pkcs11.pin_file_empty",
            f"--pkcs11-pin-file {pin_file}: empty",
            {"pin_file": str(pin_file)},
        )
    return pin_file


RECORD = Path("config") / "pkcs11-token.json"


def check_data_dir(data_dir: Path, token: ExternalToken | None) -> None:
    """A data dir keeps the token it was first started on: its key records name keys
    in that token, so starting it on another (or on a SoftHSM token it would make) would
    leave every key missing. FailedPrecondition before anything starts otherwise."""
    record = data_dir / RECORD
    softhsm = data_dir / "softhsm" / "softhsm2.conf"
    if token is None:
        if record.exists():
            raise FailedPrecondition(
                "pkcs11.token_required",
                f"{data_dir} runs on the existing token {_recorded(record)!r}: start it with "
                f"{', '.join(OPTIONS)}",
                {"data_dir": str(data_dir)},
            )
        return
    if softhsm.exists():
        raise FailedPrecondition(
            "pkcs11.softhsm_data_dir",
            f"{data_dir} holds a SoftHSM token of its own, with its keys: start it without "
            f"{OPTIONS[0]}, or use a new data dir",
            {"data_dir": str(data_dir)},
        )
    if record.exists() and (label := _recorded(record)) != token.label:
        raise FailedPrecondition(
            "pkcs11.other_token",
            f"{data_dir} runs on the token {label!r}, not {token.label!r}",
            {"data_dir": str(data_dir), "label": label},
        )


def record_token(data_dir: Path, token: ExternalToken | None) -> None:
    """Remember the token's label (and module, for people) in the data dir, no PIN."""
    if token is None:
        return
    record = data_dir / RECORD
    record.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"token_label": token.label, "module": str(token.module)}, indent=2)
    temporary = record.with_suffix(".tmp")
    temporary.write_text(text + "\n")
    temporary.replace(record)


def _recorded(record: Path) -> str:
    try:
        label = json.loads(record.read_text()).get("token_label", "")
    except (OSError, ValueError, AttributeError):
        label = ""
    return str(label)
