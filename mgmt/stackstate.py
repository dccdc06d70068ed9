"""Where a running stack is: its state file (<data-dir>/run/state.json), and the
per-user list of running stacks that lets `kmsctl` find one without being told its data
dir.

A user who started `make run EDGEKMS_DATA_DIR=./kms` and then types `kmsctl status` in
another shell without the variable would otherwise be told to run `kmsctl init`, which
is the wrong advice: the stack exists, kmsctl just looks in the default place. So `kmsctl
up` leaves a pointer (pid and data dir) under $XDG_STATE_HOME/edgekms/stacks while it
runs; a command that was given no data dir and finds no client config in the default
one uses the one running stack there is, and says which. Stale pointers (their pid gone)
are ignored. Standard library only: this is on every command's error path.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

STATE_FILE = Path("run") / "state.json"


@dataclass(frozen=True)
class RunningStack:
    """A `kmsctl up` that is alive, and what it serves."""

    pid: int
    data_dir: Path
    broker: str
    client_config: Path


def pointers_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edgekms" / "stacks"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_state(data_dir: Path) -> dict[str, object] | None:
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def running(data_dir: Path) -> RunningStack | None:
    """The live, ready stack of `data_dir`, or None (never started, stopped, killed, or
    still starting)."""
    state = read_state(data_dir)
    if state is None or not state.get("ready"):
        return None
    pid = state.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return None
    return RunningStack(
        pid,
        data_dir,
        str(state.get("broker", "")),
        Path(str(state.get("client_config", data_dir / "client" / "config.toml"))),
    )


def announce(data_dir: Path) -> Path:
    """Leave the pointer of this process's stack (called by `kmsctl up` when ready)."""
    directory = pointers_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / f"{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "data_dir": str(data_dir.resolve())}))
    tmp.replace(path)
    return path


def withdraw(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def discover() -> list[RunningStack]:
    """Every running stack this user started, per the pointers (stale ones skipped)."""
    found = []
    with contextlib.suppress(OSError):
        for entry in sorted(pointers_dir().glob("*.json")):
            try:
                data = json.loads(entry.read_text())
                data_dir = Path(str(data["data_dir"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
            stack = running(data_dir)
            if stack is not None and stack.pid == data.get("pid"):
                found.append(stack)
    return found
