"""Writing a file a user named (`--out`, `--key-out`, `--out-dir`) without harming the host.

Atomic replacement (a temporary file beside the target, then rename) is what keeps an
interrupted command from leaving half a signature behind, but renaming over a path
replaces whatever the path held. Run as root with `--out /dev/null`, that turned the
system's /dev/null into a regular file. So what the path holds decides how it is written:

* `-`: stdout.
* absent: a new file, written to a temporary file beside it and renamed (all or nothing).
* a regular file: replaced the same way; its mode is kept (secrets: 0600). A hard link
  to the old file keeps the old content.
* a character or block device, a FIFO: written in place, never created, renamed over or
  truncated.
* a symlink to a device or FIFO (`/dev/stdout`, `/dev/fd/3`): in place, through the link.
* a symlink to a regular file, or a dangling one: refused, `output.symlink`. Renaming
  would replace the link, and writing through it is the classic way to make a privileged
  program overwrite a file it never meant to.
* a directory, a socket, anything else: refused, `output.not_a_file`.

Refusals are `InvalidArgument` (exit 3) and write nothing.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
from pathlib import Path

from edgekms.errors import InvalidArgument

PUBLIC_MODE = 0o644
PRIVATE_MODE = 0o600


def _is_special(mode: int) -> bool:
    return stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode)


def _write_in_place(path: Path, data: bytes) -> None:
    # No O_CREAT (a device that vanished is not recreated as a file) and no O_TRUNC
    # (meaningless for a device or FIFO, harmful for nothing else we let through).
    fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        with os.fdopen(fd, "wb", closefd=False) as fh:
            fh.write(data)
            fh.flush()
    finally:
        os.close(fd)


def _replace_atomically(path: Path, data: bytes, mode: int) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.")  # O_EXCL, 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_file(target: str | Path, data: bytes, *, private: bool = False) -> None:
    """Write `data` to the path a user named, by the rules of the table above.

    `private` makes a new or replaced file 0600 from its first byte (keys, PKCS#12);
    otherwise a replaced file keeps its mode and a new one is 0644.
    """
    if str(target) == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    path = Path(target)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        _replace_atomically(path, data, PRIVATE_MODE if private else PUBLIC_MODE)
        return
    if stat.S_ISLNK(st.st_mode):
        try:
            resolved = os.stat(path)
        except OSError:
            resolved = None
        if resolved is not None and _is_special(resolved.st_mode):
            _write_in_place(path, data)
            return
        raise InvalidArgument(
            "output.symlink",
            f"{path} is a symbolic link to a regular file or to nothing; name the file itself",
            {"path": str(path)},
        )
    if _is_special(st.st_mode):
        _write_in_place(path, data)
        return
    if stat.S_ISREG(st.st_mode):
        mode = PRIVATE_MODE if private else stat.S_IMODE(st.st_mode)
        _replace_atomically(path, data, mode)
        return
    raise InvalidArgument(
        "output.not_a_file",
        f"{path} is neither a regular file, a device nor a FIFO; nothing written",
        {"path": str(path)},
    )


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file 0600 from the first byte (no window where others may read),
    making its directory 0700; a device or FIFO at the path is written in place. Here,
    not in mgmt.pki, so that a command writing a key (`cert issue --generate`) does not
    import the ceremony and, with it, nats-py."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_file(path, data, private=True)


def write_public(path: Path, data: bytes) -> None:
    """Write a public file (0644 when new), making its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, data)
