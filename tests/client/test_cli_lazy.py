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


def test_top_level_help_and_command_completion_import_no_command_module() -> None:
    """`kmsctl --help` and completing a command name use COMMAND_SUMMARIES: no command
    module, and so none of grpc, nats or cryptography, is imported (issue 14, item 6)."""
    code = (
        "import sys, click, mgmt.cli\n"
        "from click.testing import CliRunner\n"
        "result = CliRunner().invoke(mgmt.cli.cli, ['--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "assert 'completion' in result.output and 'key ' in result.output\n"
        "ctx = click.Context(mgmt.cli.cli)\n"
        "assert [i.value for i in mgmt.cli.cli.shell_complete(ctx, 'c')] == "
        "['ca', 'cert', 'client', 'cluster', 'completion']\n"
        "print(sorted(m for m in sys.modules if m.startswith(('mgmt.cli.', 'grpc', 'nats'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    loaded = set(ast.literal_eval(out))
    assert loaded <= {"mgmt.cli.common"}, loaded


def test_command_summaries_are_each_commands_own_short_help() -> None:
    import click

    ctx = click.Context(mgmt.cli.cli)
    assert set(mgmt.cli.COMMAND_SUMMARIES) == set(mgmt.cli.COMMAND_MODULES)
    for name, summary in mgmt.cli.COMMAND_SUMMARIES.items():
        command = mgmt.cli.cli.get_command(ctx, name)
        assert command is not None, name
        full = command.get_short_help_str(limit=1000)
        if summary.endswith("..."):
            assert full.startswith(summary.removesuffix("...")), (name, full)
        else:
            assert summary == full, (name, full)


def test_key_commands_leave_x509_and_serialization_unimported() -> None:
    """`key list` and `key sign` need grpc and the hashes, not cryptography.x509 or the
    key serialization modules (~0.1 s of imports together on this machine when quiet):
    those load only in the commands that use them."""
    code = (
        "import sys, mgmt.cli.keys, mgmt.cli.policy, mgmt.client\n"
        "print(sorted(m for m in ('cryptography.x509', "
        "'cryptography.hazmat.primitives.serialization', 'edgekms.identity', "
        "'edgekms.remote_key') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert ast.literal_eval(out) == []
