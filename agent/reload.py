"""The reload command an item runs after its files changed (`exec = ...`).

Run as an argv, never through a shell, with the item named in its environment
(EDGEKMS_AGENT_ITEM and the item's file paths), stdin closed, and a timeout after
which it is killed. No secret is ever passed: keys stay in their files. Its output is
kept to the last few hundred bytes for the log line that says how it ended.

A command that fails (exit status not 0, killed, not found) raises FailedPrecondition
`agent.reload_failed`; the runner logs it and runs it again with backoff, the files
already being correct.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence

from edgekms.errors import FailedPrecondition

OUTPUT_KEPT = 400


def run_reload(argv: Sequence[str], env: Mapping[str, str], timeout: float) -> str:
    """Run `argv` and return the tail of its output; FailedPrecondition if it fails."""
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise FailedPrecondition(
            "agent.reload_failed",
            f"reload command {argv[0]!r} not found",
            {"program": argv[0]},
        ) from None
    except PermissionError:
        raise FailedPrecondition(
            "agent.reload_failed",
            f"reload command {argv[0]!r} cannot be run (permission denied)",
            {"program": argv[0]},
        ) from None
    except subprocess.TimeoutExpired:
        raise FailedPrecondition(
            "agent.reload_failed",
            f"reload command {argv[0]!r} ran longer than {timeout:g} s and was killed",
            {"program": argv[0]},
        ) from None
    output = done.stdout.decode(errors="replace")[-OUTPUT_KEPT:].strip()
    if done.returncode != 0:
        raise FailedPrecondition(
            "agent.reload_failed",
            f"reload command {argv[0]!r} exited {done.returncode}: {output}",
            {"program": argv[0], "status": str(done.returncode)},
        )
    return output
