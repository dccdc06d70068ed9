"""The README's "Devices" commands run as written, line by line under `set -e`, against
the package's real stack (its enrollment address put in for 127.0.0.1:8444)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.doccommands import block
from tests.e2e.conftest import KmsStack

ROOT = Path(__file__).resolve().parents[2]


def devices_block() -> str:
    return block("README.md", "## Devices", 0).text


def test_readme_devices_commands_run_as_written(stack: KmsStack, tmp_path: Path) -> None:
    block = devices_block()
    assert "127.0.0.1:8444" in block
    script = "set -euo pipefail\n" + block.replace("127.0.0.1:8444", str(stack.state()["enroll"]))
    result = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env={**stack.env(), "PATH": f"{ROOT}/.venv/bin:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    shown = json.loads(result.stdout[result.stdout.rindex("{") :])
    assert shown["name"] == "sensor-7" and shown["status"] == "denied"
    assert (tmp_path / "reading.sig").stat().st_size > 0
    assert "auth." in result.stderr  # the denied device's refusal, named
