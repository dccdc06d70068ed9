"""What /proc says about a process: resident memory, CPU time, children.

VmRSS straight from /proc/<pid>/status, as the issue asks; PSS from smaps_rollup beside
it, because RSS counts pages shared between processes (libpython, libcrypto, the venv's
extension modules) once in every process, so a sum of RSS overstates what the stack
occupies; CPU from utime+stime in /proc/<pid>/stat, so the report can say how the two
cores were shared in each run.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    """VmRSS in kB, 0 if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def pss_kb(pid: int) -> int:
    """Proportional set size in kB (each shared page divided among its users), 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far, 0.0 if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # comm may hold spaces; the fields after the closing paren are fixed.
    rest = stat.rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / _TICK


def children(pid: int) -> dict[int, str]:
    """Direct children of pid: pid -> comm."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            found[int(entry.name)] = comm
    return found


class Watch:
    """Peak RSS and CPU used by named processes between start() and stop()."""

    def __init__(self, pids: Mapping[str, int], interval: float = 0.2) -> None:
        self.pids = dict(pids)
        self.interval = interval
        self.peak_kb: dict[str, int] = {name: 0 for name in self.pids}
        self.cpu: dict[str, float] = {}
        self._cpu0: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def add(self, name: str, pid: int) -> None:
        self.pids[name] = pid
        self.peak_kb.setdefault(name, 0)
        self._cpu0[name] = cpu_seconds(pid)

    def start(self) -> None:
        self._cpu0 = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        for name, pid in list(self.pids.items()):
            self.peak_kb[name] = max(self.peak_kb.get(name, 0), rss_kb(pid))

    def stop(self) -> None:
        self.sample()
        self.cpu = {
            name: cpu_seconds(pid) - self._cpu0.get(name, 0.0) for name, pid in self.pids.items()
        }
        self._stop.set()
        self._thread.join()


def wait_until(deadline_wall: float) -> None:
    delay = deadline_wall - time.time()
    if delay > 0:
        time.sleep(delay)


class PssWatch:
    """RSS and PSS of named processes sampled together while a load runs.

    The board target is on PSS (what the stack occupies, shared pages counted once),
    measured with the load running: the peak of the per-instant sum over the processes,
    not a sum of per-process peaks (which need not coincide), beside each process's own
    peak RSS and PSS. Reading smaps_rollup walks a process's mappings, so the interval is
    longer than Watch's."""

    def __init__(self, pids: Mapping[str, int], interval: float = 0.5) -> None:
        self.pids = dict(pids)
        self.interval = interval
        self.peak_rss_kb: dict[str, int] = {name: 0 for name in self.pids}
        self.peak_pss_kb: dict[str, int] = {name: 0 for name in self.pids}
        self.sums_pss_kb: list[int] = []
        self.cpu: dict[str, float] = {}
        self._cpu0: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._cpu0 = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        total = 0
        for name, pid in self.pids.items():
            rss, pss = rss_kb(pid), pss_kb(pid)
            self.peak_rss_kb[name] = max(self.peak_rss_kb[name], rss)
            self.peak_pss_kb[name] = max(self.peak_pss_kb[name], pss)
            total += pss
        self.sums_pss_kb.append(total)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        self.cpu = {
            name: round(cpu_seconds(pid) - self._cpu0.get(name, 0.0), 2)
            for name, pid in self.pids.items()
        }
