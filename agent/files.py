"""The files the agent keeps: written whole or not at all, with their mode and owner from
the first byte, and read back as they are.

mgmt.outfile writes what a person named on a command line; this writes files a daemon
replaces again and again under programs that read them at any moment (nginx, OpenVPN),
so it also sets an owner, fsyncs the directory (a power cut after the rename must not
bring back the old file with the new one's neighbours) and treats a symbolic link as an
error rather than something to follow: a compromised local user could otherwise point
/etc/nginx/tls/nas.key at a file the agent, often root, would overwrite.

Refusals are InvalidArgument `agent.file_symlink` / `agent.file_not_regular` /
`agent.owner_unknown`; an OSError (no such directory, no permission) is Unavailable
`agent.file_write_failed`: the item is retried, and what was there stays as it was.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import stat
import tempfile
from pathlib import Path

from agent.config import FileOwner
from edgekms.errors import InvalidArgument, Unavailable


def _uid(value: str | int | None) -> int:
    if value is None:
        return -1
    if isinstance(value, int):
        return value
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        raise InvalidArgument(
            "agent.owner_unknown", f"no user {value!r} on this system", {"user": value}
        ) from None


def _gid(value: str | int | None) -> int:
    if value is None:
        return -1
    if isinstance(value, int):
        return value
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise InvalidArgument(
            "agent.owner_unknown", f"no group {value!r} on this system", {"group": value}
        ) from None


def _check_target(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise InvalidArgument(
            "agent.file_symlink",
            f"{path} is a symbolic link; the agent replaces only regular files",
            {"path": str(path)},
        )
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(
            "agent.file_not_regular", f"{path} is not a regular file", {"path": str(path)}
        )


def write_atomically(path: Path, data: bytes, mode: int, owner: FileOwner) -> None:
    """Replace `path` with `data`: a temporary file beside it (mode and owner set before
    a byte is written), fsync, rename, fsync of the directory."""
    _check_target(path)
    uid, gid = _uid(owner.user), _gid(owner.group)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600, O_EXCL
    except OSError as exc:
        raise Unavailable(
            "agent.file_write_failed",
            f"cannot write beside {path}: {exc.strerror}",
            {"path": str(path)},
        ) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            if uid != -1 or gid != -1:
                os.fchown(fh.fileno(), uid, gid)
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise Unavailable(
            "agent.file_write_failed", f"cannot write {path}: {exc.strerror}", {"path": str(path)}
        ) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def fix_metadata(path: Path, mode: int, owner: FileOwner) -> bool:
    """Set a kept file's mode and owner to what the config says (someone may have
    chmod-ed the key); True if anything changed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    uid, gid = _uid(owner.user), _gid(owner.group)
    changed = False
    if (uid != -1 and st.st_uid != uid) or (gid != -1 and st.st_gid != gid):
        os.chown(path, uid, gid, follow_symlinks=False)
        changed = True
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)
        changed = True
    return changed


def read_if_regular(path: Path, limit: int = 4 << 20) -> bytes | None:
    """The file's bytes, or None if it is missing, not a regular file or larger than
    `limit` (a kept certificate or CRL file is never that large)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
        return None
    try:
        return path.read_bytes()
    except OSError:
        return None
