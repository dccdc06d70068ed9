"""`kmsctl agent`: the device-side agent that keeps certificates and CRL files fresh
(package `agent/`), and `kmsctl agent status`, which reads the state file it writes."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from mgmt.cli.common import CONTEXT_SETTINGS, ExitCode, output_option
from mgmt.cli.output import echo_json, fail, table

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="EDGEKMS_AGENT_CONFIG",
    help="The agent's TOML file (docs/agent.md): what to keep, where, what to run after.",
)


@click.group(invoke_without_command=True, context_settings=CONTEXT_SETTINGS)
@config_option
@click.option("--once", is_flag=True, help="One pass over what is due, then exit (cron, tests).")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)
@click.pass_context
def agent(ctx: click.Context, config_path: Path | None, once: bool, log_level: str) -> None:
    """Keep this device's certificates and CRL files fresh, unattended.

    Reads a TOML file listing certificates (profile, names, key/cert/chain paths,
    modes, a reload command) and CRL files, then: makes keys here (0600), gets
    certificates from the mini-CA, renews each at two thirds of its lifetime, writes
    files atomically, runs `exec` after a change, refreshes CRL files (OpenVPN's
    crl-verify) well before their nextUpdate, and retries with backoff while the KMS is
    away. Logs are JSON lines on stderr. SIGHUP reloads the file, SIGTERM stops.

    \b
    Examples:
      kmsctl agent --config /etc/edgekms/agent.toml           run (systemd: edgekms-agent)
      kmsctl agent --config agent.toml --once                 one pass; exit 8: KMS away
      kmsctl agent status --config agent.toml -o json         what is due when

    Exit codes with --once: 0 all done, 3 bad config, 6 a reload command failed,
    8 the KMS was unreachable (the next run retries).
    """
    if ctx.invoked_subcommand is not None:
        return
    if config_path is None:
        raise click.UsageError("give --config (or EDGEKMS_AGENT_CONFIG)")
    # The loop runs in a fresh interpreter without the CLI (agent.__main__ says why);
    # exec keeps this pid, so systemd supervises the agent itself.
    argv = [sys.executable, "-m", "agent", "--config", str(config_path)]
    argv += ["--log-level", log_level.lower()]
    if once:
        argv.append("--once")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, argv)
    except OSError as exc:
        click.echo(f"kmsctl: agent: cannot start {sys.executable}: {exc}", err=True)
        sys.exit(ExitCode.UNAVAILABLE)


def _row(name: str, kind: str, item: dict[str, Any] | None) -> dict[str, Any]:
    if item is None:
        return {"name": name, "kind": kind, "state": "not yet run", "next_due": None}
    error = item.get("last_error")
    return {
        "name": name,
        "kind": kind,
        "state": "failing" if item.get("failures") else "ok",
        "next_due": item.get("next_due"),
        "work_due": item.get("work_due"),
        "failures": item.get("failures", 0),
        "last_ok": item.get("last_ok"),
        "last_change": item.get("last_change"),
        "last_error": error,
        "reload_pending": item.get("reload_pending", False),
        "serial": item.get("serial") or None,
        "not_after": item.get("not_after"),
        "crl_numbers": item.get("crl_numbers") or None,
        "next_update": item.get("next_update"),
    }


@agent.command("status")
@config_option
@output_option
def status(config_path: Path | None, output: str) -> None:
    """Each item's state from the agent's state file: next due time, last success, the
    error it is failing with. Exit 0 if every item is fine, 1 if one is failing or has
    not run yet, 3 if the config does not load, 4 if the agent has written no state."""
    from agent.config import load_config
    from agent.state import read_status
    from edgekms.errors import KMSError

    if config_path is None:
        raise click.UsageError("give --config (or EDGEKMS_AGENT_CONFIG)")
    try:
        config = load_config(config_path)
    except KMSError as exc:
        fail(exc)
    document = read_status(config.state_file)
    if document is None:
        click.echo(f"kmsctl: agent.no_state: no state file at {config.state_file}", err=True)
        sys.exit(ExitCode.NOT_FOUND)
    items = document.get("items", {})
    rows = [_row(i.name, i.kind, items.get(i.name)) for i in config.items]
    healthy = all(r["state"] == "ok" for r in rows)
    if output == "json":
        echo_json(
            {
                "state_file": str(config.state_file),
                "updated": document.get("updated"),
                "pid": document.get("pid"),
                "items": rows,
            }
        )
    else:
        click.echo(
            table(
                ["NAME", "KIND", "STATE", "NEXT DUE", "DETAIL"],
                [
                    [
                        r["name"],
                        r["kind"],
                        r["state"],
                        str(r["next_due"] or "-"),
                        (r["last_error"] or {}).get("reason")
                        or (f"until {r['not_after']}" if r.get("not_after") else "")
                        or (f"next update {r['next_update']}" if r.get("next_update") else ""),
                    ]
                    for r in rows
                ],
            )
        )
        click.echo(f"state written {document.get('updated')} ({time.strftime('%H:%M:%S')} now)")
    sys.exit(ExitCode.OK if healthy else ExitCode.FAILURE)


def register(cli: click.Group) -> None:
    cli.add_command(agent)
