"""`python -m bench.startup`: how long `kmsctl up` takes to be ready, warm and cold.

The issue's target is start to ready in 2 s. One start is too noisy to judge a change on
a shared 2-core machine, so this starts the stack as the bench does (bench.stackrun:
`kmsctl up --tpm swtpm --ca-http ...`, timed from spawn to state.json "ready") several
times on a fresh data dir (cold: token, bus TLS, bcrypt hashes, ceremony) and on one
already-initialised data dir (warm), and prints each time, the median and the load
average. `--timeline` adds one warm start's events from every log, relative to spawn,
to show what is on the critical path.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import tempfile
from pathlib import Path

from bench import stackrun
from bench.procs import cpu_seconds

# nats-server's log lines: "[pid] 2026/11/21 13:59:24.629951 [INF] message".
_NATS_LINE = re.compile(r"^\[\d+\] (\d{4}/\d\d/\d\d \d\d:\d\d:\d\d\.\d+) \[\w+\] (.*)$")


def _timed_start(data_dir: Path, log_level: str) -> tuple[float, dict[str, float]]:
    """Seconds to ready, and CPU seconds each process of the stack had used by then.

    CPU is the steadier figure on a shared machine: waiting for a core stretches the
    wall-clock time but not the CPU a start needs."""
    stack = stackrun.start(data_dir, log_level=log_level)
    try:
        cpu = {name: cpu_seconds(pid) for name, pid in stack.pids().items()}
        return stack.ready_seconds, cpu
    finally:
        stack.stop()


def _summary(name: str, runs: list[tuple[float, dict[str, float]]]) -> str:
    times = [t for t, _ in runs]
    parts = sorted({p for _, cpu in runs for p in cpu})
    cpu = {p: statistics.median(c.get(p, 0.0) for _, c in runs) for p in parts}
    total = statistics.median(sum(c.values()) for _, c in runs)
    return (
        f"{name}: median {statistics.median(times):.2f} s, min {min(times):.2f}, "
        f"max {max(times):.2f}; " + " ".join(f"{t:.2f}" for t in times) + "\n"
        f"  CPU s by ready (median): total {total:.2f}; "
        + ", ".join(f"{p} {v:.2f}" for p, v in cpu.items())
    )


def _events(data_dir: Path, since: float) -> list[tuple[float, str, str]]:
    """(unix time, part, message) of every log line written after `since`."""
    found: list[tuple[float, str, str]] = []
    logs = [*sorted((data_dir / "logs").glob("*.log")), data_dir.parent / f"{data_dir.name}-up.log"]
    for path in logs:
        part = path.stem
        for line in path.read_text(errors="replace").splitlines():
            when: float | None = None
            message = line
            if line.startswith("{"):
                try:
                    entry = json.loads(line)
                    stamp = datetime.datetime.strptime(entry["ts"], "%Y-%m-%dT%H:%M:%S.%fZ")
                    when = stamp.replace(tzinfo=datetime.UTC).timestamp()
                    extra = {
                        k: v
                        for k, v in entry.items()
                        if k not in ("ts", "level", "service", "logger", "msg")
                    }
                    message = f"{entry['msg']} {extra if extra else ''}".strip()
                except (ValueError, KeyError):
                    continue
            elif match := _NATS_LINE.match(line):
                stamp = datetime.datetime.strptime(match.group(1), "%Y/%m/%d %H:%M:%S.%f")
                when = stamp.timestamp()  # nats-server logs local time
                message = match.group(2)
            if when is not None and when >= since:
                found.append((when, part, message[:150]))
    return sorted(found)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__)
    parser.add_argument("--runs", type=int, default=10, help="starts of each kind")
    parser.add_argument("--no-cold", action="store_true", help="warm starts only")
    parser.add_argument("--timeline", action="store_true", help="events of one warm start")
    parser.add_argument("--log-level", default="warning", help="kmsctl up --log-level")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edgekms-startup-"))
    try:
        cold: list[tuple[float, dict[str, float]]] = []
        for i in range(0 if args.no_cold else args.runs):
            cold.append(_timed_start(work / f"cold{i}", args.log_level))
            shutil.rmtree(work / f"cold{i}", ignore_errors=True)
        warm_dir = work / "warm"
        _timed_start(warm_dir, args.log_level)  # initialises the data dir
        warm = [_timed_start(warm_dir, args.log_level) for _ in range(args.runs)]
        for name, runs in (("cold", cold), ("warm", warm)):
            if runs:
                print(_summary(name, runs))
        print("load average after:", " ".join(f"{x:.2f}" for x in os.getloadavg()))
        if args.timeline:
            since = datetime.datetime.now(datetime.UTC).timestamp()
            stack = stackrun.start(warm_dir, log_level="debug")
            try:
                t0 = since
                for when, part, message in _events(warm_dir, since):
                    print(f"{when - t0:7.3f}  {part:12} {message}")
                print(f"{stack.ready_seconds:7.3f}  ready (state.json)")
            finally:
                stack.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
