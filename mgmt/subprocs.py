"""The processes EdgeKMS starts and owns (nats-server, swtpm, the supervised services):
each runs in its own session, so a Ctrl-C at the terminal reaches only `kmsctl up`,
which then stops them in order; its output is appended to its log file; and it is
ended with SIGTERM and, if it has not exited within the grace period, SIGKILL."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path


def spawn(
    argv: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    umask: int = -1,
) -> subprocess.Popen[bytes]:
    """Start `argv` in its own session, output appended to `log_path`; `umask` (when
    given) is the child's, so files and sockets it makes are born with tight modes."""
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            list(argv),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=None if env is None else dict(env),
            start_new_session=True,
            umask=umask,
        )


def end(process: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> bool:
    """SIGTERM, then SIGKILL after `timeout` seconds; False if it was not running."""
    if process is None or process.poll() is not None:
        return False
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return True


def kill(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.kill()
        process.wait()
