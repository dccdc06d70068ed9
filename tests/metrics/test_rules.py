"""The example alert rules (deploy/prometheus/) pass `promtool check rules`, and
`promtool test rules` shows each of the issue's three alerts (service down, TPM in
lockout, CRL about to expire), and issue 21's two (an audit stream filling, the archiver
failing), firing on the series that should fire it, and not before."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"

pytestmark = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="needs promtool (Debian's prometheus)"
)


def test_the_example_rules_are_valid() -> None:
    done = subprocess.run(
        ["promtool", "check", "rules", str(RULES_DIR / "edgekms-rules.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 11 rules found" in done.stdout


def test_the_alerts_fire_on_their_series() -> None:
    done = subprocess.run(
        ["promtool", "test", "rules", "edgekms-rules.test.yml"],
        cwd=RULES_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_a_broken_rule_is_caught(tmp_path: Path) -> None:
    """The check is not a formality: a rule with a bad expression fails it."""
    broken = (
        (RULES_DIR / "edgekms-rules.yml")
        .read_text()
        .replace("expr: edgekms_tpm_in_lockout == 1", "expr: edgekms_tpm_in_lockout == = 1")
    )
    assert "== = 1" in broken
    (tmp_path / "broken.yml").write_text(broken)
    done = subprocess.run(
        ["promtool", "check", "rules", str(tmp_path / "broken.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
