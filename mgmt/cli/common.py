"""Options and conventions shared by every kmsctl command: where the data dir and the
client config are, output format, and what exit codes mean."""

from __future__ import annotations

import enum
import os
from pathlib import Path

import click

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class ExitCode(enum.IntEnum):
    """Stable exit codes for scripts. Errors from the KMS map by their code."""

    OK = 0
    FAILURE = 1  # the operation ran and said no (e.g. a signature that does not verify)
    USAGE = 2  # click's own: bad options
    INVALID_ARGUMENT = 3
    NOT_FOUND = 4
    ALREADY_EXISTS = 5
    FAILED_PRECONDITION = 6
    PERMISSION_DENIED = 7  # also unauthenticated
    UNAVAILABLE = 8  # also deadline exceeded: try again later
    INTERNAL = 9


def default_data_dir() -> Path:
    env = os.environ.get("EDGEKMS_DATA_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "edgekms"


data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=default_data_dir,
    envvar="EDGEKMS_DATA_DIR",
    show_default="$EDGEKMS_DATA_DIR or ~/.local/share/edgekms",
    help="Where the embedded stack keeps its state, and where the client config is.",
)

output_option = click.option(
    "-o",
    "--output",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="text for people, json for scripts.",
)


def client_config_path(data_dir: Path) -> Path:
    """The client config `kmsctl init` writes and every client command reads."""
    return data_dir / "client" / "config.toml"
