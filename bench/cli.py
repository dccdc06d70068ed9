"""How long a person waits for `kmsctl`: p50 wall time of `kmsctl --help`, `key list` and
`key sign` against a running stack, each a fresh process as a shell runs it (issue 14,
item 6, target 200 ms). `python -m bench.cli` starts a stack of its own and writes
bench/results/cli.json and cli.md; `python -m bench` runs `measure` on its stack too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.stats import markdown_table, percentile

BIN = Path(sys.executable).parent
TARGET_MS = 200.0
KEY = "bench/cli"


def _tab(line: str) -> dict[str, str]:
    """The environment bash's completion function gives kmsctl for a TAB at the end of
    `line` (what `kmsctl completion bash` installs)."""
    return {
        "_KMSCTL_COMPLETE": "bash_complete",
        "COMP_WORDS": line,
        "COMP_CWORD": str(len(line.split(" ")) - 1),
    }


def _commands(work: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (arguments, extra environment). A TAB on a key name is measured twice: with
    no cached names (it asks the broker), and with the names the TAB before fetched
    (mgmt/cli/completion.py's cache), as when a person types on and presses TAB again."""
    message = work / "message.txt"
    message.write_bytes(b"a message to sign\n")
    return {
        "kmsctl --help": (["--help"], {}),
        "kmsctl key list": (["key", "list"], {}),
        "kmsctl key sign": (["key", "sign", KEY, "--in", str(message), "--out", os.devnull], {}),
        "TAB: a command (kmsctl ke)": ([], _tab("kmsctl ke")),
        "TAB: a key name, broker asked": ([], _tab("kmsctl key sign bench/")),
        "TAB: a key name, from the cache": ([], _tab("kmsctl key sign bench/c")),
    }


def _time(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall ms, CPU ms of the process): on a shared machine the CPU time says what the
    command costs, the wall time what a person waited."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = (time.perf_counter() - started) * 1000
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000
    return wall, cpu


def measure(data_dir: Path, runs: int = 21, work: Path | None = None) -> dict[str, Any]:
    """p50/p90/min in ms per command, `runs` each after one warm-up (page cache)."""
    env = {**os.environ, "EDGEKMS_DATA_DIR": str(data_dir)}
    kmsctl = str(BIN / "kmsctl")
    with tempfile.TemporaryDirectory() as scratch:
        commands = _commands(work or Path(scratch))
        created = subprocess.run(
            [kmsctl, "key", "create", KEY, "--type", "ec-p256"], env=env, capture_output=True
        )
        if created.returncode not in (0, 5):  # 5: made by an earlier run
            raise RuntimeError(created.stderr.decode())
        figures: dict[str, Any] = {}
        cache = Path(scratch) / "cache"
        for name, (args, extra) in commands.items():
            run_env = {**env, **extra, "XDG_CACHE_HOME": str(cache)}
            fresh = "broker asked" in name
            _time([kmsctl, *args], run_env)
            pairs = []
            for _ in range(runs):
                if fresh:  # no cached names: this TAB asks the broker
                    shutil.rmtree(cache, ignore_errors=True)
                else:  # the names stay as fresh as a TAB a moment ago left them
                    for kept in cache.glob("edgekms/*.json"):
                        os.utime(kept)
                pairs.append(_time([kmsctl, *args], run_env))
            wall = sorted(w for w, _ in pairs)
            cpu = sorted(c for _, c in pairs)
            figures[name] = {
                "p50_ms": round(percentile(wall, 50), 1),
                "p90_ms": round(percentile(wall, 90), 1),
                "min_ms": round(wall[0], 1),
                "cpu_p50_ms": round(percentile(cpu, 50), 1),
                "runs": runs,
            }
    return {"commands": figures, "target_ms": TARGET_MS, "loadavg": os.getloadavg()}


def render(result: dict[str, Any]) -> str:
    rows = [
        [
            name,
            f["p50_ms"],
            f["p90_ms"],
            f["min_ms"],
            f["cpu_p50_ms"],
            "yes" if f["p50_ms"] <= TARGET_MS else "no",
        ]
        for name, f in result["commands"].items()
    ]
    load = ", ".join(f"{x:.2f}" for x in result["loadavg"])
    return (
        "# kmsctl start-up\n\n"
        f"{platform.node()} ({platform.machine()}), load average at the end {load}.\n\n"
        + markdown_table(
            ["command", "p50 ms", "p90 ms", "min ms", "CPU p50 ms", "p50 ≤ 200 ms"], rows
        )
        + "\n"
    )


def main() -> None:
    from bench import stackrun

    parser = argparse.ArgumentParser(prog="python -m bench.cli", description=__doc__)
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        stack = stackrun.start(Path(work) / "data")
        try:
            result = measure(stack.data_dir, args.runs, Path(work))
        finally:
            stack.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cli.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "cli.md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
