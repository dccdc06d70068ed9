"""The README's agent section, as written: its TOML becomes agent.toml unchanged and its
shell block runs line by line under `set -e` against the real stack. The one thing the
test machine cannot do is reload a system nginx through systemd, so `systemctl` on the
PATH is a small script that records the argv it was given: proof the agent ran the
reload command, as an argv, after writing the certificate."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from tests.agent.conftest import AgentStack
from tests.conftest import SLOWDOWN
from tests.doccommands import block

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
HEADING = "## Devices keep themselves fresh: `kmsctl agent`"


def _block(kind: str) -> str:
    """The section's `toml` block (agent.toml) or its shell block, the one
    tests/doccommands.py lists for this test."""
    if kind == "sh":
        return block("README.md", HEADING, 0).text
    text = README.read_text()
    section = text[text.index(HEADING) :]
    match = re.search(rf"^```{kind}\n(.*?)^```", section, flags=re.DOTALL | re.MULTILINE)
    assert match, f"no {kind} block in the agent section"
    return match.group(1)


def test_readme_agent_section_runs_as_written(agent_stack: AgentStack, tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text(_block("toml"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    recorder = bin_dir / "systemctl"
    recorder.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{tmp_path / "systemctl.log"}"\n')
    recorder.chmod(0o755)
    env = {
        **agent_stack.stack.env(),
        "PATH": f"{bin_dir}:{ROOT}/.venv/bin:/usr/bin:/bin",
    }
    subprocess.run(
        [str(ROOT / ".venv/bin/kmsctl"), "ca", "certs", "--out-dir", "ca"],
        cwd=tmp_path, env=env, check=True, capture_output=True, timeout=60 * SLOWDOWN,
    )  # fmt: skip
    result = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + _block("sh")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180 * SLOWDOWN,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "tls/nas.crt: OK" in result.stdout
    status = json.loads(result.stdout[result.stdout.index("{") : result.stdout.rindex("}") + 1])
    assert {i["name"]: i["state"] for i in status["items"]} == {
        "nginx": "ok",
        "openvpn-crl": "ok",
    }
    assert (tmp_path / "systemctl.log").read_text() == "reload nginx\n"
    assert (tmp_path / "tls" / "crl.pem").read_bytes().startswith(b"-----BEGIN X509 CRL-----")
    assert (tmp_path / "tls" / "nas.key").stat().st_mode & 0o777 == 0o600
