"""`kmsctl`: the administrators' CLI. One module per command group; this file only
assembles them. Exit codes (mgmt.cli.output.ExitCode) mean the same in every command."""

from __future__ import annotations

import atexit
import gc
import importlib
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    import click.shell_completion

from mgmt.cli.common import CONTEXT_SETTINGS

# Which modules make each top-level command, in the order they register: a command
# imports only its own modules, so `kmsctl up` (and `kmsctl ca serve`, which it starts)
# does not pay for every group's imports before it can start anything.
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "up": ("stack",),
    "init": ("stack",),
    "status": ("stack",),
    "key": ("keys", "policy"),
    "ca": ("ca",),
    "cert": ("certs", "cert_export"),
    "audit": ("audit",),
    "client": ("clients",),
    "enroll": ("enroll",),
    "device": ("devices",),
    "tpm": ("tpm",),
    "unlock": ("unlock",),
    "acme": ("acme",),
    "agent": ("agent",),
    "spiffe": ("spiffe",),
    "completion": ("completion",),
    "backup": ("backup",),
    "restore": ("backup",),
    "cluster": ("cluster",),
    "fleet": ("fleet",),
}


# Each command's one-line help, as `kmsctl --help` lists it: kept here so that the top
# help and completing a command name import no command module (the key and audit
# modules pull in grpc, cryptography and nats: most of a second on a small board).
# tests/client/test_cli_lazy.py holds it equal to each command's own short help.
COMMAND_SUMMARIES: dict[str, str] = {
    "up": "Run the embedded EdgeKMS in the foreground until Ctrl-C.",
    "init": "Run the bootstrap ceremony (once; later runs change nothing).",
    "status": "Is everything answering? Exit 0 only if the broker, the bus,...",
    "key": "Create, inspect, use and retire keys.",
    "ca": "The mini-CA: VPN and HTTPS certificates whose CA keys live in...",
    "cert": "Certificates from the mini-CA: issue, list, show, revoke, renew.",
    "audit": "Read the hash-chained audit log and verify it.",
    "client": "Clients of the broker: their certificates, roles and key patterns.",
    "enroll": "Enroll this device with a one-time token, or manage tokens (`enroll token`).",
    "device": "Enrolled devices: list, show, deny and allow (one device or a --group).",
    "tpm": "The TPM behind crypto service tpm0.",
    "unlock": "Disk-unlock secrets released to TPM-attested devices against a fresh quote.",
    "acme": "ACME (RFC 8555): accounts, external account binding keys, the name policy.",
    "agent": "Keep this device's certificates and CRL files fresh, unattended.",
    "spiffe": "SPIFFE workload identity: trust domain, registration entries, Workload...",
    "completion": "Print the shell completion script for bash, zsh or fish.",
    "backup": "Write an encrypted backup of a stopped stack's data dir.",
    "restore": "Restore a backup into a new data dir, then start it with `kmsctl up...",
    "cluster": "Run EdgeKMS on several boxes: one bundle per node, then `kmsctl up --join`.",
    "fleet": "A fleet hub's devices: uplink bundles, names for the hub's CA, list, remove.",
}


class _LazyGroup(click.Group):
    """A group whose commands are registered when first asked for by name."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            _register(COMMAND_MODULES.get(cmd_name, ()))
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMAND_MODULES)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMAND_SUMMARIES.get(name, "")) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def shell_complete(
        self, ctx: click.Context, incomplete: str
    ) -> list[click.shell_completion.CompletionItem]:
        from click.shell_completion import CompletionItem

        items = [
            CompletionItem(name, help=COMMAND_SUMMARIES.get(name))
            for name in self.list_commands(ctx)
            if name.startswith(incomplete)
        ]
        # Options of the group itself (--version, --help) when the word starts with "-".
        items.extend(click.Command.shell_complete(self, ctx, incomplete))
        return items


@click.group(cls=_LazyGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="edgekms", prog_name="kmsctl")
def cli() -> None:
    """Manage an EdgeKMS: keys in a TPM or PKCS#11 token, a mini-CA, clients, audit.

    \b
    Start here:
      kmsctl up                     run the embedded stack in the foreground
      kmsctl status                 is everything answering?
      kmsctl key create web --type ec-p256
      kmsctl key sign web --in file.txt --out file.sig

    Every command takes --data-dir (env EDGEKMS_DATA_DIR); commands that print take
    -o json for scripts.
    """


_registered: set[str] = set()


def _register(names: tuple[str, ...]) -> None:
    # Imported here so each group module can import `cli` helpers without cycles.
    for name in names:
        if name in _registered:
            continue
        _registered.add(name)
        try:
            module = importlib.import_module(f"mgmt.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"mgmt.cli.{name}":
                raise
            continue
        module.register(cli)


def _register_all() -> None:
    for names in COMMAND_MODULES.values():
        _register(names)


def main() -> None:
    """The console script. Runs the command, then leaves without the interpreter's
    teardown when nothing can be lost by it (see _exit_fast)."""
    if _short_lived(sys.argv[1:], os.environ):
        # Nothing such a run makes lives long enough to need the cycle collector, and
        # its full passes over the ~100,000 objects grpc and protobuf create at import
        # cost ~20 ms of CPU, a tenth of a `key sign` (docs/performance.md).
        gc.disable()
    try:
        cli(prog_name="kmsctl")
    except SystemExit as exc:
        _exit_fast(exc.code)
        raise
    _exit_fast(0)


# Top-level commands that are one request and an answer (every `key` subcommand), and
# shell completion (one TAB): runs of bounded length and memory. Not `up`, `agent`,
# `audit tail --follow` and the other commands that may run for days.
SHORT_LIVED_COMMANDS = frozenset({"key"})


def _short_lived(args: list[str], environ: Mapping[str, str]) -> bool:
    """Is this run one of SHORT_LIVED_COMMANDS or a completion request (a TAB)?"""
    if environ.get("_KMSCTL_COMPLETE"):
        return True
    return bool(args) and args[0] in SHORT_LIVED_COMMANDS


def _exit_fast(code: object) -> None:
    """Exit with `code` now: atexit handlers run, stdout and stderr are flushed, and then
    os._exit skips the rest of the interpreter's shutdown (tearing down grpc, protobuf and
    some 400 modules): about 40 ms of CPU of every `kmsctl key ...` (docs/performance.md,
    "kmsctl start-up"). Returns, for the ordinary exit, when that could lose anything: a
    non-integer code (Python prints it), a thread that shutdown would wait for, or a
    stream that cannot be flushed (Python reports that its own way)."""
    if code is not None and not isinstance(code, int):
        return
    threading = sys.modules.get("threading")
    if threading is not None:
        main_thread = threading.main_thread()
        for thread in threading.enumerate():
            if thread is not main_thread and not thread.daemon and thread.is_alive():
                return
    # The handlers run here, once: _run_exitfuncs clears them, so the ordinary exit
    # below (if a stream fails) does not run them again.
    atexit._run_exitfuncs()
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):
        return
    os._exit(code or 0)
