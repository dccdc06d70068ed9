"""The agent's process: `kmsctl agent --config agent.toml` execs `python -m agent`.

Like `kmsctl ca serve`, the CLI parses its options and then replaces itself (same pid,
so systemd and signals see one process) with this interpreter, which loads only the
agent: a process that lives for months on a small board should not carry click and
every kmsctl command group. Its arguments are exactly the ones kmsctl passes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

# Exit codes as mgmt.cli.common.ExitCode numbers them (not imported: it imports click).
EXIT_USAGE = 2

USAGE = "usage: python -m agent --config PATH [--once] [--log-level LEVEL]"


def parse_args(argv: Sequence[str]) -> tuple[str, bool, str]:
    """(config path, once, log level); ValueError for anything else."""
    config, once, level = "", False, "info"
    rest = list(argv)
    while rest:
        name = rest.pop(0)
        if name == "--once":
            once = True
        elif name in ("--config", "--log-level") and rest:
            value = rest.pop(0)
            if name == "--config":
                config = value
            else:
                level = value
        else:
            raise ValueError(f"unexpected argument {name!r}")
    if not config:
        raise ValueError("--config is required")
    if level.lower() not in ("debug", "info", "warning", "error"):
        raise ValueError(f"--log-level {level!r}: debug, info, warning or error")
    return config, once, level


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config_arg, once, level = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"kmsctl: agent: {exc}\n{USAGE}", file=sys.stderr)
        return EXIT_USAGE

    from pathlib import Path

    from agent.config import load_config
    from agent.runner import Agent, exit_code_for
    from edgekms.errors import KMSError
    from edgekms.logs import setup_logging

    setup_logging("agent", level)
    try:
        agent = Agent(load_config(Path(config_arg)))
    except KMSError as exc:
        print(f"kmsctl: {exc.reason}: {exc.message}", file=sys.stderr)
        return exit_code_for(exc)
    if once:
        return agent.run_once()
    agent.install_signals()
    return agent.run_forever()


if __name__ == "__main__":
    sys.exit(main())
