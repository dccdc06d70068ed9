"""Size-based rotation of the logs `kmsctl up` keeps under <data-dir>/logs.

Each child writes its stdout and stderr straight into its log file (opened O_APPEND by
mgmt.subprocs), so a child cannot rotate it and must not need to: the supervisor checks
the sizes every few seconds and, past the limit, copies the file to `<name>.1` (older
copies shifted up to `<name>.<backups>`, the oldest dropped) and truncates it in place.
The child's next write lands at the new end, offset 0. Lines written between the copy
and the truncation are lost (logrotate's copytruncate has the same window, a few
microseconds here).

A full log directory is no reason to stop a KMS: when the copy fails for lack of space
it is given up, older copies are dropped to make room, and the live log is truncated all
the same, so the services keep logging and the disk gets its space back.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from pathlib import Path
from typing import NamedTuple

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 5


class Rotated(NamedTuple):
    """One log rotated. A NamedTuple, not a dataclass: the lean watcher of `kmsctl up`
    (mgmt.upwatch) imports this module, and dataclasses costs it ~1.5 MB."""

    path: Path
    size: int
    # False when the copy was given up (no space): the old lines are gone.
    kept: bool


def _backup(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def rotate_if_big(path: Path, max_bytes: int, backups: int) -> Rotated | None:
    """Rotate `path` if it has reached `max_bytes`; what was done, or None."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size < max_bytes:
        return None
    kept = False
    if backups > 0:
        with contextlib.suppress(FileNotFoundError):
            _backup(path, backups).unlink()
        for n in range(backups - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(_backup(path, n), _backup(path, n + 1))
        partial = path.with_name(f"{path.name}.1.partial")
        import shutil  # only when a log is rotated: the lean watcher stays small

        try:
            shutil.copyfile(path, partial)
            os.replace(partial, _backup(path, 1))
            kept = True
        except OSError as exc:
            partial.unlink(missing_ok=True)
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # The directory is full: the copies are what can go.
            for n in range(1, backups + 1):
                _backup(path, n).unlink(missing_ok=True)
    os.truncate(path, 0)
    return Rotated(path, size, kept)


def rotate_all(directory: Path, max_bytes: int, backups: int) -> list[Rotated]:
    """Every `*.log` in `directory` that has grown past `max_bytes`."""
    done = []
    for path in sorted(directory.glob("*.log")):
        rotated = rotate_if_big(path, max_bytes, backups)
        if rotated is not None:
            done.append(rotated)
    return done


def rotate_and_report(directory: Path, max_bytes: int, backups: int, log: logging.Logger) -> None:
    """rotate_all, each rotation said on `log`: a log truncated without a copy (the
    directory full) as a warning, a failure to rotate too, never raised, since a
    supervisor must go on watching its children whatever the disk does. Both
    supervisors (mgmt.stack's loop and the lean mgmt.upwatch) call this."""
    from edgekms.logs import fields

    try:
        rotated = rotate_all(directory, max_bytes, backups)
    except OSError as exc:
        log.warning("log rotation failed", extra=fields(error=str(exc)))
        return
    for done in rotated:
        if done.kept:
            log.info("log rotated", extra=fields(log=done.path.name, size=done.size))
        else:
            log.warning(
                "log directory full: log truncated without a copy",
                extra=fields(log=done.path.name, size=done.size),
            )
