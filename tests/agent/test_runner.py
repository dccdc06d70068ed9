"""The agent's loop without a KMS: SIGHUP's config reload, and the state file it keeps
(a restarted agent remembers when each item is due)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from agent.config import load_config
from agent.runner import Agent
from agent.state import ItemState, load_state, save_state

CRL = '[[crl]]\nname = "{name}"\npath = "{path}"\n'


def write_config(tmp_path: Path, *names: str) -> Path:
    path = tmp_path / "agent.toml"
    body = 'client_config = "client/config.toml"\n' + "".join(
        CRL.format(name=n, path=tmp_path / f"{n}.pem") for n in names
    )
    path.write_text(body)
    return path


def test_sighup_with_a_broken_file_keeps_the_old_config(tmp_path: Path) -> None:
    path = write_config(tmp_path, "vpn-crl")
    agent = Agent(load_config(path))
    before = agent.config
    agent.install_signals()
    try:
        path.write_text(path.read_text() + 'mode = "0777x"\n')
        os.kill(os.getpid(), signal.SIGHUP)  # the handler only flags the reload
        assert agent._reload_config is True
        agent.reload_config()
        assert agent.config is before
        path.write_text(write_config(tmp_path, "vpn-crl", "web-crl").read_text())
        agent.reload_config()
        assert [i.name for i in agent.config.items] == ["vpn-crl", "web-crl"]
        assert agent.states["web-crl"].next_due == 0.0  # a new item is due at once
    finally:
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        agent.close()


def test_state_file_round_trip_and_a_torn_one_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state = ItemState(kind="cert", next_due=1_800_000_000.0, work_due=1_800_000_000.0)
    state.serial, state.failures = "0ABC", 2
    state.last_error = {"reason": "agent.reload_failed", "message": "exited 1"}
    save_state(path, {"web": state}, 1_799_999_000.0)
    loaded = load_state(path)["web"]
    assert loaded.next_due == state.next_due and loaded.serial == "0ABC"
    assert loaded.failures == 2 and loaded.last_error == state.last_error
    assert json.loads(path.read_text())["items"]["web"]["next_due"] == "2027-01-15T08:00:00Z"
    path.write_text('{"version": 1, "items": {"web": ')
    assert load_state(path) == {}


def test_a_restarted_agent_keeps_due_times(tmp_path: Path) -> None:
    path = write_config(tmp_path, "vpn-crl")
    config = load_config(path)
    save_state(config.state_file, {"vpn-crl": ItemState(kind="crl", next_due=2e9)}, 1e9)
    agent = Agent(config)
    assert agent.states["vpn-crl"].next_due == 2e9
    agent.close()


def test_a_pending_reload_whose_command_was_removed_is_dropped(tmp_path: Path) -> None:
    """A reload left pending by a failure, then taken out of the config at SIGHUP: the
    next pass forgets it instead of running an empty command."""
    path = write_config(tmp_path, "vpn-crl")
    agent = Agent(load_config(path))
    state = agent.states["vpn-crl"]
    state.work_due, state.reload_pending = 2e9, True  # not due; only the reload pending
    (item,) = agent.config.items
    assert agent.tick(item, 1e9) is None
    assert state.reload_pending is False and state.failures == 0
    agent.close()
