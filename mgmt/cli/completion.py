"""`kmsctl completion bash|zsh|fish`, and completing key names from the running stack.

Click completes commands and options itself when the shell calls `kmsctl` with
_KMSCTL_COMPLETE set; this prints the script that makes the shell do so. Key names come
from the broker: one ListKeys with a short deadline, and on any failure (no stack, no
config, a slow broker) no suggestions rather than an error in the middle of a command
line being typed.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from click.shell_completion import CompletionItem

# A TAB must not hang the shell: a broker that has not answered by then is left alone.
KEY_LIST_DEADLINE = 1.0
SHELLS = ("bash", "zsh", "fish")
# The names a TAB fetched are kept this long, so the next TABs on the same word (typing
# on after the first) cost no gRPC import, TLS handshake or call: ~0.1 s of CPU each.
CACHE_SECONDS = 10.0


def _cache_file(config: Path) -> Path:
    """Per user (0600 in a 0700 directory) and per client config: another user never
    reads this user's key names, another stack's names never answer for this one."""
    import hashlib
    import os

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(str(config.expanduser().resolve()).encode()).hexdigest()[:16]
    return base / "edgekms" / f"key-names-{digest}.json"


def _cached_names(cache: Path, incomplete: str) -> list[str] | None:
    """The names a TAB of the last CACHE_SECONDS fetched for a prefix of `incomplete`,
    narrowed to it; None when there is no such answer (then the broker is asked)."""
    import json
    import time

    try:
        if time.time() - cache.stat().st_mtime > CACHE_SECONDS:
            return None
        kept = json.loads(cache.read_text())
        prefix, names = kept["prefix"], kept["names"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(prefix, str) or not incomplete.startswith(prefix):
        return None
    return [n for n in names if isinstance(n, str) and n.startswith(incomplete)]


def _keep_names(cache: Path, incomplete: str, names: list[str]) -> None:
    import json
    import os

    cache.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    part = cache.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"prefix": incomplete, "names": names}, out)
    os.replace(part, cache)


def complete_key_names(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Names of the keys this client may see that start with `incomplete`; [] on any
    failure (completion must fail silent). Answered from a short-lived per-user cache
    when a TAB of the last CACHE_SECONDS fetched a prefix of `incomplete`."""
    from click.shell_completion import CompletionItem

    try:
        from mgmt.cli.common import client_config_path, default_data_dir

        root = ctx.find_root()
        params = {**root.params, **ctx.params}
        config = Path(
            params.get("config_path")
            or client_config_path(Path(params.get("data_dir") or default_data_dir()))
        )
        cache = _cache_file(config)
        names = _cached_names(cache, incomplete)
        if names is None:
            from mgmt.client import KMSClient

            with KMSClient.from_config(config, timeout=KEY_LIST_DEADLINE) as kms:
                names = [k.name for k in kms.list_keys(prefix=incomplete)]
            # No cache directory (read-only home): every TAB asks the broker.
            with contextlib.suppress(OSError):
                _keep_names(cache, incomplete, names)
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
