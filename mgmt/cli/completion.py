"""`kmsctl completion bash|zsh|fish`, and completing key names from the running stack.

Click completes commands and options itself when the shell calls `kmsctl` with
_KMSCTL_COMPLETE set; this prints the script that makes the shell do so. Key names come
from the broker: one ListKeys with a short deadline, and on any failure (no stack, no
config, a slow broker) no suggestions rather than an error in the middle of a command
line being typed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from click.shell_completion import CompletionItem

# A TAB must not hang the shell: a broker that has not answered by then is left alone.
KEY_LIST_DEADLINE = 1.0
SHELLS = ("bash", "zsh", "fish")


def complete_key_names(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Names of the keys this client may see that start with `incomplete`; [] on any
    failure (completion must fail silent)."""
    from click.shell_completion import CompletionItem

    try:
        from mgmt.cli.common import client_config_path, default_data_dir
        from mgmt.client import KMSClient

        root = ctx.find_root()
        params = {**root.params, **ctx.params}
        config = params.get("config_path") or client_config_path(
            Path(params.get("data_dir") or default_data_dir())
        )
        with KMSClient.from_config(config, timeout=KEY_LIST_DEADLINE) as kms:
            names = [k.name for k in kms.list_keys(prefix=incomplete)]
    except Exception:
        return []
    return [CompletionItem(name) for name in names]


@click.command()
@click.argument("shell", type=click.Choice(SHELLS))
def completion(shell: str) -> None:
    """Print the shell completion script for bash, zsh or fish.

    It completes commands, options and, from the running stack, key names (for the
    data dir in --data-dir or EDGEKMS_DATA_DIR; nothing if no stack answers).

    \b
    bash:  echo 'eval "$(kmsctl completion bash)"' >> ~/.bashrc
    zsh:   echo 'eval "$(kmsctl completion zsh)"' >> ~/.zshrc
    fish:  kmsctl completion fish > ~/.config/fish/completions/kmsctl.fish
    """
    from click.shell_completion import get_completion_class

    from mgmt.cli import cli

    shell_class = get_completion_class(shell)
    assert shell_class is not None, shell  # click ships all three
    click.echo(shell_class(cli, {}, "kmsctl", "_KMSCTL_COMPLETE").source())


def register(cli: click.Group) -> None:
    cli.add_command(completion)
