"""`kmsctl`: the administrators' CLI. One module per command group; this file only
assembles them. Exit codes (mgmt.cli.output.ExitCode) mean the same in every command."""

from __future__ import annotations

import click

from mgmt.cli.common import CONTEXT_SETTINGS


@click.group(context_settings=CONTEXT_SETTINGS)
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


def _register() -> None:
    # Imported here so each group module can import `cli` helpers without cycles.
    import importlib

    for name in ("stack", "keys", "ca", "certs", "audit", "clients", "policy"):
        try:
            module = importlib.import_module(f"mgmt.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"mgmt.cli.{name}":
                raise
            continue
        module.register(cli)


_register()


def main() -> None:
    cli(prog_name="kmsctl")
