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

from edgekms import errors
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
        try:
            return fn(*args, **kwargs)
        except (errors.Unavailable, errors.DeadlineExceeded) as exc:
            if not exc.reason.startswith("transport.") or kwargs.get("config_path"):
                raise
            raise type(exc)(
                exc.reason, f"{exc.message}; {_not_answering(kwargs['data_dir'])}", exc.details
            ) from None

    return wrapper


def _not_answering(data_dir: Path) -> str:
    """What to do when the broker of `data_dir`'s config did not answer."""
    from mgmt.stackstate import running

    stack = running(data_dir)
    if stack is None:
        return (
            f"no `kmsctl up` is running on {data_dir}: start it (`kmsctl up --data-dir "
            f"{data_dir}`), or point at the running stack's data dir with --data-dir or "
            "EDGEKMS_DATA_DIR"
        )
    return (
        f"`kmsctl up` (pid {stack.pid}) runs on {data_dir} with its broker on {stack.broker}; "
        f"see {data_dir / 'logs' / 'broker.log'}"
    )


def resolve_config(data_dir: Path) -> Path:
    """The client config of `data_dir`; when no data dir was given (neither --data-dir
    nor EDGEKMS_DATA_DIR) and the default has none, that of the one stack this user runs
    (mgmt.stackstate). Otherwise FailedPrecondition `config.missing` with what to do."""
    path = client_config_path(data_dir)
    if path.exists():
        return path
    from mgmt.stackstate import discover

    ctx = click.get_current_context(silent=True)
    source = ctx.get_parameter_source("data_dir") if ctx is not None else None
    defaulted = source in (click.core.ParameterSource.DEFAULT, None)
    stacks = discover() if defaulted else []
    if len(stacks) == 1:
        click.echo(
            f"kmsctl: using the stack running on {stacks[0].data_dir} (pid {stacks[0].pid});"
            f" set EDGEKMS_DATA_DIR={stacks[0].data_dir} to say so",
            err=True,
        )
        return stacks[0].client_config
    if len(stacks) > 1:
        where = ", ".join(str(s.data_dir) for s in stacks)
        hint = f"stacks run on {where}: choose one with --data-dir or EDGEKMS_DATA_DIR"
    elif not data_dir.exists():
        hint = (
            f"{data_dir} does not exist. If `kmsctl up` runs with another data dir, pass it "
            f"(--data-dir or EDGEKMS_DATA_DIR); to start a stack here, `kmsctl up --data-dir "
            f"{data_dir}`"
        )
    else:
        hint = (
            f"start the stack with `kmsctl up --data-dir {data_dir}` (it writes one), pass a "
            "running stack's data dir (--data-dir or EDGEKMS_DATA_DIR) or --config, or run "
            "`kmsctl init` for services you run yourself"
        )
    raise errors.FailedPrecondition(
        "config.missing", f"no client config at {path}: {hint}", {"path": str(path)}
    )


def open_client(data_dir: Path, config_path: Path | None, timeout: float = 10.0) -> KMSClient:
    from mgmt.client import KMSClient

    return KMSClient.from_config(config_path or resolve_config(data_dir), timeout=timeout)


def write_output(target: str, data: bytes) -> None:
    """Write a command's result where --out says: all or nothing for a file, in place for
    a device or FIFO, stdout for '-' (the rules and why: mgmt/outfile.py)."""
    from mgmt.outfile import write_file

    write_file(target, data)
