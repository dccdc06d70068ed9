#!/usr/bin/env python3
"""edgekms-wait: block until a container's dependencies are there, or give up.

Why the services wait for themselves: compose's `condition: service_healthy` needs the
engine to run healthchecks on a schedule, which podman does with systemd timers and a
machine without systemd never fires, so a stack ordered by health never starts there.
Each role instead waits here for what it needs (a file another one-shot writes, a TCP
port another service opens) before it execs its program. Under every engine
`depends_on` only orders the starts; past the deadline the role exits non-zero and
`restart: on-failure` tries again.

    edgekms-wait [--timeout SECONDS] file:PATH | tcp:HOST:PORT | sock:PATH ...
"""

from __future__ import annotations

import os
import socket
import stat
import sys
import time

USAGE = "usage: edgekms-wait [--timeout SECONDS] file:PATH|tcp:HOST:PORT|sock:PATH ..."


def ready(target: str) -> bool:
    kind, _, rest = target.partition(":")
    if kind == "file":
        return os.path.isfile(rest)
    if kind == "sock":
        # Only that the socket exists: a probe connection would take swtpm's one client slot.
        try:
            return stat.S_ISSOCK(os.stat(rest).st_mode)
        except OSError:
            return False
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=2.0):
                return True
        except OSError:
            return False
    raise ValueError(target)


def main(argv: list[str]) -> int:
    timeout = 120.0
    targets = argv[1:]
    if targets[:1] == ["--timeout"] and len(targets) >= 2:
        timeout = float(targets[1])
        targets = targets[2:]
    if not targets or any(t.partition(":")[0] not in ("file", "tcp", "sock") for t in targets):
        print(USAGE, file=sys.stderr)
        return 64
    deadline = time.monotonic() + timeout
    pending = list(targets)
    while pending:
        pending = [t for t in pending if not ready(t)]
        if not pending:
            break
        if time.monotonic() >= deadline:
            print(
                f"edgekms-wait gave_up after={timeout:.0f}s pending={','.join(pending)}",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
