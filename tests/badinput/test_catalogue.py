"""Keeps the bad-input catalogue in docs/security.md honest: enough rows, every cited
test exists in the suite as it is now, and no case or test is cited twice. A renamed or
deleted test, or a copied row, fails here rather than leaving the document wrong."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "security.md"
SECTION = "## Bad-input catalogue"
AREAS = {
    "audit archive",
    "gRPC",
    "NATS",
    "CSR",
    "PIN/auth",
    "key",
    "client certificate",
    "CA",
    "config",
    "output",
    "ACME",
    "agent",
    "stack",
    "metrics",
    "backup",
    "attest",
    "unlock",
    "SPIFFE",
    "cluster",
    "fleet",
}
MIN_ROWS = 40


@dataclass(frozen=True)
class Row:
    number: int
    area: str
    bad_input: str
    error: str
    left: str
    test: str


def parse_catalogue(text: str) -> list[Row]:
    """The table rows of the catalogue section; header and separator rows are skipped."""
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end != -1 else len(text)]
    rows: list[Row] = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or not cells[0].isdigit():
            continue
        assert len(cells) == 6, f"row needs 6 cells: {line}"
        test = re.fullmatch(r"`([^`]+)`", cells[5])
        assert test, f"test cell must be one node id in backticks: {line}"
        rows.append(Row(int(cells[0]), cells[1], cells[2], cells[3], cells[4], test.group(1)))
    return rows


@pytest.fixture(scope="module")
def rows() -> list[Row]:
    return parse_catalogue(DOC.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def collected(rows: list[Row]) -> set[str]:
    """Node ids pytest collects from the files the catalogue cites, in one subprocess."""
    files = sorted({r.test.split("::")[0] for r in rows})
    missing = [f for f in files if not (ROOT / f).is_file()]
    assert not missing, f"cited files do not exist: {missing}"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {line.strip() for line in done.stdout.splitlines() if "::" in line}


def test_parser_reads_rows_and_skips_the_header() -> None:
    text = (
        "# x\n## Bad-input catalogue\n\n| # | area | bad input | typed error | left | test |\n"
        "|---|---|---|---|---|---|\n| 1 | key | a | b | c | `t.py::x` |\n## Next\n| 2 | k | a |\n"
    )
    assert parse_catalogue(text) == [Row(1, "key", "a", "b", "c", "t.py::x")]


def test_catalogue_has_enough_numbered_rows(rows: list[Row]) -> None:
    assert len(rows) >= MIN_ROWS
    assert [r.number for r in rows] == list(range(1, len(rows) + 1))


def test_every_area_is_covered_and_known(rows: list[Row]) -> None:
    areas = {r.area for r in rows}
    assert areas <= AREAS, areas - AREAS
    assert areas == AREAS, AREAS - areas


def test_every_row_names_its_error_and_what_is_left(rows: list[Row]) -> None:
    for row in rows:
        assert row.bad_input and row.error and row.left, row


def test_no_case_or_test_is_cited_twice(rows: list[Row]) -> None:
    for field in ("bad_input", "test"):
        values = [getattr(r, field) for r in rows]
        twice = {v for v in values if values.count(v) > 1}
        assert not twice, f"{field} cited more than once: {twice}"


def test_every_cited_test_exists(rows: list[Row], collected: set[str]) -> None:
    absent = [r.test for r in rows if r.test not in collected]
    assert not absent, f"cited tests that pytest does not collect: {absent}"


def test_known_defects_are_strict_xfails(rows: list[Row]) -> None:
    """A row marked xfail must cite a test carrying xfail(strict=True), and vice versa for
    the catalogue's own tests, so a fix shows up as XPASS and the row gets updated."""
    for row in rows:
        path, _, name = row.test.partition("::")
        source = (ROOT / path).read_text(encoding="utf-8")
        func = name.split("[")[0]
        head = source[: source.index(f"def {func}(")]
        decorators = head[head.rfind("\n\n\n") :]
        marked = "xfail(" in decorators and "strict=True" in decorators
        assert marked == ("**xfail**" in row.error), row
