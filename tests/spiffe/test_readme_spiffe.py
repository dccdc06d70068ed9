"""The README's SPIFFE section, as written: its KMS block runs line by line under
`set -e` against a fresh real stack (with a mini-CA, as the section says), the device
block (`kmsctl spiffe agent`, as written) with the enrolled device's own paths in place
of /var/lib and /run (which the test must not touch), and a program running as uid 1000
then gets spiffe://home.arpa/backup."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SLOWDOWN
from tests.doccommands import block
from tests.e2e.conftest import KmsStack, start_stack, stop_stack
from tests.enroll.test_enroll import enrolled
from tests.spiffe.conftest import Agent, wait_for, workload

ROOT = Path(__file__).resolve().parents[2]
HEADING = "## Workload identity: SPIFFE"


def _blocks() -> list[str]:
    return [block("README.md", HEADING, i).text for i in (0, 1)]


@pytest.fixture
def fresh_stack(tmp_path: Path) -> Iterator[KmsStack]:
    stack = start_stack(tmp_path / "data")
    try:
        with stack.client(timeout=60) as kms:
            kms.ca_init("Home CA")
        yield stack
    finally:
        assert stop_stack(stack) == 0


def test_readme_spiffe_section_runs_as_written(fresh_stack: KmsStack, tmp_path: Path) -> None:
    kms_block, device_block = _blocks()
    env = {**fresh_stack.env(), "PATH": f"{ROOT}/.venv/bin:/usr/bin:/bin"}
    done = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + kms_block],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300 * SLOWDOWN,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    # init and create print a line each; the listing is the JSON after them.
    listed = json.loads(done.stdout[done.stdout.index("\n[") + 1 :])
    assert [(e["spiffe_id"], e["node"], e["ttl_seconds"]) for e in listed] == [
        ("spiffe://home.arpa/backup", "nas", 1800)
    ]
    assert (tmp_path / "home.arpa-bundle.pem").read_text().startswith("-----BEGIN CERTIFICATE")

    device_config = enrolled(fresh_stack, tmp_path, "nas")
    line = device_block.strip()
    config, sock = "/var/lib/edgekms/device/config.toml", "/run/edgekms/workload.sock"
    assert line.startswith(f"kmsctl spiffe agent --client-config {config} ")
    assert f"--socket unix://{sock}" in line

    def as_written(socket: Path) -> list[str]:
        """The device block's line itself, with this test's paths for the device's."""
        command = line.replace(config, str(device_config)).replace(sock, str(socket))
        return ["bash", "-c", f'export PATH="{ROOT}/.venv/bin:$PATH"; exec {command}']

    agent = Agent(device_config, tmp_path / "agent", argv=as_written)
    try:
        answer = wait_for(
            lambda: (a := workload(agent.socket, 1000, 1000, "x509")).get("svids") and a,
            60,
            "the backup SVID",
        )
        assert [s["spiffe_id"] for s in answer["svids"]] == ["spiffe://home.arpa/backup"]
        assert workload(agent.socket, 1001, 1001, "x509")["error"] == "PERMISSION_DENIED"
    finally:
        agent.stop()
