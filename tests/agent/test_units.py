"""The agent's systemd units (board image and deploy/) and its example config: the
config loads with the agent's own loader, the units run it confined and may write only
where the config writes."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from agent.config import load_config

ROOT = Path(__file__).resolve().parents[2]
YOCTO_UNIT = ROOT / "yocto-layer/recipes-edgekms/edgekms/files/edgekms-agent.service"
DEPLOY_UNIT = ROOT / "deploy/agent/edgekms-agent.service"
CONFIGS = [ROOT / "deploy/agent/agent.toml", YOCTO_UNIT.parent / "edgekms-agent.toml"]
CONFINED = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectClock": "yes",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "CAP_CHOWN CAP_FOWNER CAP_DAC_OVERRIDE",
    "Restart": "on-failure",
    "UMask": "0077",
}


def read_unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(path.read_text())
    return unit


@pytest.mark.parametrize("path", [YOCTO_UNIT, DEPLOY_UNIT], ids=["yocto", "deploy"])
def test_unit_runs_the_agent_confined(path: Path) -> None:
    service = read_unit(path)["Service"]
    for key, value in CONFINED.items():
        assert service.get(key) == value, key
    start = service["ExecStart"].replace("@BINDIR@", "/usr/bin").replace("@SYSCONFDIR@", "/etc")
    assert start.split()[1:] == ["agent", "--config", "/etc/edgekms/agent.toml"]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"  # SIGHUP rereads the config
    assert "\nSystemCallFilter=@system-service\n" in path.read_text()


def test_both_units_say_the_same() -> None:
    """deploy/'s copy is the board's with its paths filled in."""
    yocto = YOCTO_UNIT.read_text()
    filled = (
        yocto.replace("@BINDIR@", "/usr/local/bin")
        .replace("@SYSCONFDIR@", "/etc")
        .replace("@LOCALSTATEDIR@", "/var")
    )
    lines = [x for x in filled.splitlines() if not x.startswith("ConditionPathIsMountPoint")]
    assert DEPLOY_UNIT.read_text().splitlines() == lines


@pytest.mark.parametrize("path", CONFIGS, ids=["deploy", "yocto"])
def test_example_config_loads_and_writes_only_where_the_unit_may(path: Path) -> None:
    config = load_config(path)
    writable = Path(read_unit(DEPLOY_UNIT)["Service"]["ReadWritePaths"])
    assert config.state_file.is_relative_to(writable)
    written = [c.cert for c in config.certs] + [c.key for c in config.certs]
    written += [c.chain for c in config.certs if c.chain] + [c.path for c in config.crls]
    assert written and all(p.is_relative_to(writable) for p in written)
    assert all(c.key_mode == 0o600 for c in config.certs)
    assert CONFIGS[0].read_text() == CONFIGS[1].read_text()
