"""The fleet as the docs show it, run as written on loopback (issue 14, item 9): the
README's block ("Who may do what", the fleet lines) and docs/cluster.md's "Fleet:
devices as leaf nodes" (add-device, allow, list, the hub, the device, `audit verify
--device`). Substituted only: the hub's leaf address (`hub.lan:7422`, `0.0.0.0:7422`)
by a free loopback port, each machine's data dir by one under the test's directory
(EDGEKMS_DATA_DIR for the lines that take the default), and the `kmsctl up` lines are
started by tests/fleet/test_up_fleet.py's `Up` with the line's own options (it adds
free ports for NATS, the broker, enrollment and the CA's HTTP, and stops them)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mgmt.natsauth import BROKER_USER
from mgmt.natsserver import free_port
from tests.conftest import SLOWDOWN
from tests.doccommands import ROOT, block, lines, run_lines
from tests.fleet.test_up_fleet import Up, device_head, sign

pytestmark = pytest.mark.timeout(900)

WHO = "## Who may do what"
FLEET = "## Fleet: devices as leaf nodes"


@pytest.fixture
def ups() -> Iterator[list[Up]]:
    started: list[Up] = []
    yield started
    for up in reversed(started):
        up.stop()


def env_for(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKMS_")}
    return {**env, "EDGEKMS_DATA_DIR": str(data_dir), "PATH": f"{ROOT}/.venv/bin:/usr/bin:/bin"}


def start(up_line: str, name: str, data_dir: Path, cwd: Path, ups: list[Up]) -> Up:
    """A `kmsctl up` line of the docs as an `Up`: its options kept but --data-dir (the
    test's), file arguments resolved against the block's directory."""
    args = shlex.split(up_line, comments=True)
    assert args[:2] == ["kmsctl", "up"], up_line
    extra = args[2:]
    if "--data-dir" in extra:
        at = extra.index("--data-dir")
        assert extra[at + 1] == "/var/lib/edgekms"
        del extra[at : at + 2]
    extra = [str(cwd / a) if a.endswith(".toml") else a for a in extra]
    up = Up(name, data_dir, extra)
    ups.append(up)
    up.start()
    up.wait_ready()
    return up


def verified(line: str, hub: Path, cwd: Path, head: str) -> subprocess.CompletedProcess[str]:
    """Poll the doc's `audit verify --device` line (its `-o json` form read for the
    device's broker head) until the hub's copy holds the device's head."""
    deadline = time.monotonic() + 120 * SLOWDOWN
    probe = line if "-o json" in line else line.split("#")[0].strip() + " -o json"
    while True:
        done = subprocess.run(
            ["bash", "-c", probe], cwd=cwd, env=env_for(hub), capture_output=True, text=True,
            timeout=120 * SLOWDOWN,
        )  # fmt: skip
        if done.returncode == 0 and json.loads(done.stdout)["heads"].get(BROKER_USER) == head:
            return done
        assert time.monotonic() < deadline, done.stdout + done.stderr
        time.sleep(0.5)


def test_readme_fleet_lines_run_as_written(tmp_path: Path, ups: list[Up]) -> None:
    leaf = f"127.0.0.1:{free_port()}"
    text = block("README.md", WHO, 1).text.replace("hub.lan:7422", leaf)
    add, hub_line, device_line, verify = lines(text.replace("0.0.0.0:7422", leaf))
    hub_dir, device_dir = tmp_path / "hub" / "data", tmp_path / "a1" / "data"
    hub_dir.parent.mkdir()
    device_dir.parent.mkdir()
    run_lines([add], tmp_path, env_for(hub_dir))
    assert (tmp_path / "uplink-a1.toml").stat().st_mode & 0o777 == 0o600
    hub = start(hub_line, "hub", hub_dir, tmp_path, ups)
    assert hub.state()["fleet"]["devices"] == ["a1"]
    device = start(device_line, "a1", device_dir, tmp_path, ups)
    assert device.state()["fleet"]["role"] == "device"
    sign(device, "dev/a1-key", 2)
    report = json.loads(verified(verify, hub_dir, tmp_path, device_head(device)).stdout)
    assert report["ok"] and report["device"] == "a1" and report["entries"] > 2
    (as_written,) = run_lines([verify], tmp_path, env_for(hub_dir))
    assert as_written.out.strip()


def test_cluster_doc_fleet_runs_as_written(tmp_path: Path, ups: list[Up]) -> None:
    leaf = f"127.0.0.1:{free_port()}"
    hub_dir, device_dir = tmp_path / "hub" / "data", tmp_path / "a1" / "data"
    hub_dir.parent.mkdir()
    device_dir.parent.mkdir()

    def fleet_block(index: int) -> list[str]:
        text = block("docs/cluster.md", FLEET, index).text
        return lines(text.replace("hub.lan:7422", leaf).replace("0.0.0.0:7422", leaf))

    ran = run_lines(fleet_block(3), tmp_path, env_for(hub_dir))
    listed = ran[-1].out
    assert "a1" in listed and "b2" in listed and "a1.lan" in listed
    (hub_line,) = fleet_block(4)
    hub = start(hub_line, "hub", hub_dir, tmp_path, ups)
    assert hub.state()["fleet"]["devices"] == ["a1", "b2"]
    (device_line,) = fleet_block(5)
    device = start(device_line, "a1", device_dir, tmp_path, ups)
    sign(device, "dev/a1-key", 2)
    (verify,) = fleet_block(6)
    verified(verify, hub_dir, tmp_path, device_head(device))
    plain, as_json = run_lines(fleet_block(2), tmp_path, env_for(hub_dir))
    assert plain.out.strip()
    report = json.loads(as_json.out)
    assert report["ok"] and report["device"] == "a1"
    assert (run_lines([verify], tmp_path, env_for(hub_dir))[0]).code == 0
