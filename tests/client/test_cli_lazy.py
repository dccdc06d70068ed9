"""`kmsctl` imports a command's modules only when that command runs, and still lists
and runs every command (mgmt.cli.COMMAND_MODULES)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mgmt.cli

CLI_DIR = Path(mgmt.cli.__file__).parent


def test_up_imports_only_its_own_command_module() -> None:
    code = (
        "import sys, mgmt.cli\n"
        "assert mgmt.cli.cli.get_command(None, 'up') is not None\n"
        "print(sorted(m for m in sys.modules if m.startswith('mgmt.cli.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    loaded = set(ast.literal_eval(out))
    assert "mgmt.cli.stack" in loaded
    assert not loaded & {"mgmt.cli.keys", "mgmt.cli.certs", "mgmt.cli.audit", "mgmt.cli.ca"}


def test_every_module_that_registers_commands_is_listed() -> None:
    registering = {
        path.stem
        for path in CLI_DIR.glob("*.py")
        if any(
            isinstance(node, ast.FunctionDef) and node.name == "register"
            for node in ast.parse(path.read_text()).body
        )
    }
    listed = {name for names in mgmt.cli.COMMAND_MODULES.values() for name in names}
    assert registering == listed


def test_every_listed_command_exists_and_help_lists_them_all() -> None:
    import click

    ctx = click.Context(mgmt.cli.cli)
    assert set(mgmt.cli.cli.list_commands(ctx)) == set(mgmt.cli.COMMAND_MODULES)
    for name in mgmt.cli.COMMAND_MODULES:
        assert mgmt.cli.cli.get_command(ctx, name) is not None, name
    key = mgmt.cli.cli.get_command(ctx, "key")
    assert isinstance(key, click.Group) and "policy" in key.commands
