"""What every kmsctl command that talks to the broker shares: the --data-dir and --config
options with the one-line error report, the client those options name, and writing a
result to the file a user named. Kept apart from the command modules so that each command
loads only its own module (tests/client/test_cli_lazy.py)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import click

from mgmt.cli.common import client_config_path, data_dir_option
from mgmt.cli.output import handle_errors

if TYPE_CHECKING:
    from mgmt.client import KMSClient

P = ParamSpec("P")
R = TypeVar("R")


def client_options(fn: Callable[P, R]) -> Callable[..., R]:
    """--data-dir and --config, and turn KMSError into the one-line report + exit code."""

    @data_dir_option
    @click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="EDGEKMS_CONFIG",
        default=None,
        help="Client config (broker address, CA, client certificate).  "
        "[default: $EDGEKMS_CONFIG or DATA_DIR/client/config.toml]",
    )
    @functools.wraps(fn)
    @handle_errors
    def wrapper(*args: Any, **kwargs: Any) -> R:
        return fn(*args, **kwargs)

    return wrapper


def open_client(data_dir: Path, config_path: Path | None, timeout: float = 10.0) -> KMSClient:
    from mgmt.client import KMSClient

    return KMSClient.from_config(config_path or client_config_path(data_dir), timeout=timeout)


def write_output(target: str, data: bytes) -> None:
    """Write a command's result where --out says: all or nothing for a file, in place for
    a device or FIFO, stdout for '-' (the rules and why: mgmt/outfile.py)."""
    from mgmt.outfile import write_file

    write_file(target, data)
