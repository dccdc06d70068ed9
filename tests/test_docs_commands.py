"""Docs that stand alone (issue 14, item 9): nothing in the repository points outside it
(a link to ../shared, a path on the machine it was written on),
every relative link in the Markdown resolves to a file in it, every `kmsctl` command
shown in README.md and docs/*.md is one the CLI accepts as written (command, options and
their order: `kmsctl --config X status` was shown and failed), and every one is run by a
test as written or listed, with its reason, as one the suite cannot run
(tests/doccommands.py: the blocks, who runs them, the list).
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import click
import pytest

from mgmt.cli import cli
from tests import doccommands

ROOT, DOCS = doccommands.ROOT, doccommands.DOCS
TEXT_SUFFIXES = {".md", ".py", ".toml", ".yaml", ".yml", ".sh", ".bb", ".bbappend", ".conf", ""}
LINK = re.compile(r"\]\(([^)\s]+)\)")
# A path on the machine the repository was written on (its shared tools, other
# worktrees): in a clone it names nothing. Tests' temporary dirs are not spelled so.
OUTSIDE = re.compile(r"(?<![\w.])/work/(?:shared|wt|main)\b")


def _tracked() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return [ROOT / p for p in out.splitlines() if Path(p).suffix in TEXT_SUFFIXES]


def test_nothing_points_outside_the_repository() -> None:
    offenders = []
    for path in _tracked():
        if not path.is_file() or path.name == Path(__file__).name:
            continue
        text = path.read_text(errors="replace")
        if "../shared" in text or "shared/DESIGN" in text or OUTSIDE.search(text):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_every_relative_markdown_link_resolves_inside_the_repository() -> None:
    broken = []
    for doc in [*DOCS, ROOT / "yocto-layer" / "README.md"]:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            resolved = (doc.parent / target.split("#")[0]).resolve()
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert broken == []


COMMANDS = doccommands.commands()


def _parse(
    command: click.Command, name: str, args: list[str], parent: click.Context | None
) -> None:
    try:
        ctx = command.make_context(name, args, parent=parent)
    except click.exceptions.Exit:
        return  # --help, --version
    except click.MissingParameter:
        raise
    except click.BadParameter as exc:
        # A value the docs stand in for (a file named in the text that is not here).
        message = exc.format_message()
        if "does not exist" in message or "No such file or directory" in message:
            return
        raise
    if isinstance(command, click.Group):
        rest = [*ctx._protected_args, *ctx.args]
        if not rest and command.invoke_without_command:
            return  # a group that runs itself (`kmsctl enroll --token ...`)
        sub_name, sub, sub_args = command.resolve_command(ctx, rest)
        assert sub is not None and sub_name is not None
        _parse(sub, sub_name, sub_args, ctx)


def test_the_docs_show_kmsctl_commands() -> None:
    assert len(COMMANDS) > 30


@pytest.mark.parametrize(("doc", "line"), COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS])
def test_every_kmsctl_command_in_the_docs_parses(doc: str, line: str) -> None:
    argv = shlex.split(line, comments=True)
    if "..." in argv:
        pytest.skip("elided on purpose (`...`)")
    try:
        _parse(cli, "kmsctl", argv[1:], None)
    except click.UsageError as exc:
        pytest.fail(f"{doc}: `{line}`: {exc.format_message()}")


def test_every_kmsctl_command_in_the_docs_runs_or_is_listed_with_its_reason() -> None:
    """A new command in the docs fails here until a test runs its block (RUN) or it is
    listed in CANNOT_RUN with why."""
    unrun = [
        f"{b.doc} {b.heading!r} block {b.index}: {c}"
        for b in doccommands.blocks()
        if (b.doc, b.heading, b.index) not in doccommands.RUN
        for c in b.commands
        if c not in doccommands.CANNOT_RUN
    ]
    assert unrun == []


def test_the_runners_named_exist_and_take_their_blocks_from_the_doc() -> None:
    """Each RUN entry names a block that is there, with a command, and a test file that
    names the block's heading (it finds the block by it)."""
    found = {(b.doc, b.heading, b.index): b for b in doccommands.blocks()}
    wrong = []
    for key, test in doccommands.RUN.items():
        source = ROOT / test
        if key not in found or not found[key].commands:
            wrong.append(f"{key}: no such block with a kmsctl command")
        elif not source.is_file() or key[1].lstrip("# ") not in source.read_text():
            wrong.append(f"{key}: {test} does not name the heading")
    assert wrong == []


def test_the_cannot_run_list_is_short_reasoned_and_current() -> None:
    """A listed line is one no test runs (a runner of its block leaves it out and checks
    it is listed); each is still in the docs, with a reason saying what stops it and
    what runs instead."""
    shown = {c for _, c in COMMANDS}
    stale = [c for c in doccommands.CANNOT_RUN if c not in shown]
    assert stale == [], "listed but no longer in the docs"
    assert all(len(reason) > 20 for reason in doccommands.CANNOT_RUN.values())
    assert len(doccommands.CANNOT_RUN) < len(shown) // 4
