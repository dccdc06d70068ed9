"""`kmsctl up --pkcs11-module M --pkcs11-token-label L --pkcs11-pin-file F`: the stack on a
PKCS#11 token that exists already (a board's OP-TEE token, provisioned by
edgekms-provision) instead of a SoftHSM token it makes itself.

The board's token is played by a SoftHSM token each test makes with softhsm2-util before
`kmsctl up` starts (its own label and 0600 PIN file, SOFTHSM2_CONF in the environment as
libckteec needs none). Real stacks: one-node cluster (`--join`), a fleet hub
(`--leaf-listen`) and its device (`--uplink`), each signing with keys that are then found
in the test's token; and every bad combination refused before anything starts."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgekms import natsrpc
from edgekms.errors import InvalidArgument
from edgekms.fleet import fleet_stream
from mgmt.cli import cli
from mgmt.client import KMSClient
from mgmt.natsauth import BROKER_USER, local_credentials
from mgmt.natsserver import free_port
from mgmt.softhsm import init_token
from tests.conftest import SLOWDOWN
from tests.e2e.conftest import start_stack
from tests.fleet.test_up_fleet import FleetUp, Up, caught_up, device_head, kmsctl, sign, until

pytestmark = pytest.mark.timeout(900)


@dataclass(frozen=True)
class BoardToken:
    """A token made before the stack, as a board's provisioning makes OP-TEE's."""

    conf: Path
    module: str
    label: str
    pin: str
    pin_file: Path

    def up_args(self) -> list[str]:
        return [
            "--pkcs11-module", self.module, "--pkcs11-token-label", self.label,
            "--pkcs11-pin-file", str(self.pin_file),
        ]  # fmt: skip

    def private_keys(self) -> int:
        """Private keys in the token, counted by another process logged in with the PIN
        from its file (libsofthsm2 reads SOFTHSM2_CONF when loaded: this test process
        has loaded the session's token already)."""
        script = (
            "import pathlib, sys, pkcs11\n"
            "lib = pkcs11.lib(sys.argv[1])\n"
            "token = lib.get_token(token_label=sys.argv[2])\n"
            "pin = pathlib.Path(sys.argv[3]).read_text().strip()\n"
            "with token.open(user_pin=pin) as session:\n"
            "    print(len(list(session.get_objects("
            "{pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY}))))\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script, self.module, self.label, str(self.pin_file)],
            env={**os.environ, "SOFTHSM2_CONF": str(self.conf)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return int(done.stdout.strip())


def board_token(directory: Path, label: str) -> BoardToken:
    """A token `label` in `directory`'s softhsm2.conf (several labels may share one conf)
    made with softhsm2-util, and its user PIN in a 0600 file of its own."""
    pin = secrets.token_hex(8)
    token = init_token(directory, label, pin=pin, so_pin=secrets.token_hex(8))
    pin_file = directory / f"{label}.pin"
    pin_file.write_text(pin + "\n")
    pin_file.chmod(0o600)
    return BoardToken(token.conf, token.module, label, pin, pin_file)


def assert_uses_token(data_dir: Path, provider: str, token: BoardToken) -> None:
    """The crypto service's config names the given token, and no SoftHSM token or PIN
    of the stack's own was made."""
    conf = (data_dir / "config" / f"crypto-{provider}.toml").read_text()
    assert f'module = "{token.module}"' in conf
    assert f'token_label = "{token.label}"' in conf
    assert f'pin_file = "{token.pin_file}"' in conf
    assert not (data_dir / "softhsm").exists()
    assert not (data_dir / "secrets" / f"{provider}.pin").exists()
    # The data dir remembers its token (no PIN), so a later start on another is refused.
    record = json.loads((data_dir / "config" / "pkcs11-token.json").read_text())
    assert record == {"token_label": token.label, "module": token.module}
    assert not (data_dir / "secrets" / f"{provider}.so-pin").exists()


def assert_pin_nowhere(data_dir: Path, pids: list[int], token: BoardToken) -> None:
    """The PIN is in no command line, environment or log of the stack."""
    needle = token.pin.encode()
    for pid in pids:
        assert needle not in Path(f"/proc/{pid}/cmdline").read_bytes(), pid
        assert needle not in Path(f"/proc/{pid}/environ").read_bytes(), pid
    for log in data_dir.parent.rglob("*.log"):
        assert needle not in log.read_bytes(), log
    for config in (data_dir / "config").iterdir():
        assert needle not in config.read_bytes(), config


@pytest.fixture
def tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The directory whose softhsm2.conf holds the tests' board tokens, in the
    environment every `kmsctl up` started by the test inherits."""
    directory = tmp_path / "board-tokens"
    directory.mkdir()
    monkeypatch.setenv("SOFTHSM2_CONF", str(directory / "softhsm2.conf"))
    yield directory


def test_cluster_nodes_sign_with_the_tokens_they_were_given(tokens: Path, tmp_path: Path) -> None:
    """Two `kmsctl up --join` nodes (nats-server will not run a JetStream cluster of
    one), each on its own board token: a key made on n2's provider through n1's broker
    lands in n2's token and signs."""
    board = {node: board_token(tokens, f"board-{node}") for node in ("n1", "n2")}
    ports = {node: (free_port(), free_port()) for node in board}
    out = tmp_path / "bundles"
    nodes = [f"--node={n}=127.0.0.1:{r}:{b}" for n, (r, b) in ports.items()]
    made = kmsctl("cluster", "init", "--name", "pair", *nodes, "--out", str(out))
    assert made.returncode == 0, made.stderr
    ups = {
        node: Up(
            node,
            tmp_path / node,
            ["--join", str(out / node), *token.up_args()],
            broker=f"127.0.0.1:{ports[node][1]}",
        )
        for node, token in board.items()
    }
    try:
        for up in ups.values():
            up.start()
        for up in ups.values():
            up.wait_ready(240)
        for node, token in board.items():
            assert_uses_token(ups[node].data_dir, f"hsm-{node}", token)
        assert board["n1"].private_keys() >= 1  # the internal CA's key, from the ceremony
        before = {node: token.private_keys() for node, token in board.items()}
        with KMSClient.from_config(ups["n1"].client_config, timeout=60 * SLOWDOWN) as client:
            client.create_key("board/n2", "ec-p256", provider="hsm-n2")
            signature = client.sign("board/n2", b"signed in n2's token")
            assert client.verify("board/n2", b"signed in n2's token", signature)
        assert board["n2"].private_keys() == before["n2"] + 1
        assert board["n1"].private_keys() == before["n1"]
        for up in ups.values():
            assert up.process is not None
            children = [int(p) for p in up.state()["children"].values()]
            for token in board.values():
                assert_pin_nowhere(up.data_dir, [up.process.pid, *children], token)
    finally:
        for up in ups.values():
            up.stop()


def test_a_fleet_hub_and_device_each_on_its_own_token(tokens: Path, tmp_path: Path) -> None:
    hub_token, device_token = board_token(tokens, "board-hub"), board_token(tokens, "board-a")
    leaf = f"127.0.0.1:{free_port()}"
    # Sized as the board's hub unit sizes it: each device's copy 8 MiB.
    hub_args = ["--leaf-listen", leaf, "--fleet-copy-limit", "8MiB", *hub_token.up_args()]
    hub = Up("hub", tmp_path / "hub", hub_args)
    fleet = FleetUp(tmp_path, leaf, hub, {})
    try:
        fleet.add_device("a")
        device = fleet.devices["a"]
        device.extra += device_token.up_args()
        hub.start()
        device.start()
        hub.wait_ready()
        device.wait_ready()
        assert_uses_token(hub.data_dir, "hsm0", hub_token)
        assert_uses_token(device.data_dir, "hsm0", device_token)
        device_keys, hub_keys = device_token.private_keys(), hub_token.private_keys()
        assert device_keys >= 1 and hub_keys >= 1  # each stack's internal CA key
        sign(device, "dev/a-key", 3)
        # The device's new key is in the device's token, and none in the hub's.
        assert device_token.private_keys() == device_keys + 1
        assert hub_token.private_keys() == hub_keys
        until("a's audit at the hub", caught_up(fleet, "a", device_head(device)))
        assert copy_max_bytes(hub, "a") == 8 * 1024**2
        for up in (hub, device):
            assert up.process is not None
            children = [int(p) for p in up.state()["children"].values()]
            assert_pin_nowhere(up.data_dir, [up.process.pid, *children], device_token)
            assert_pin_nowhere(up.data_dir, [up.process.pid, *children], hub_token)
    finally:
        device_up = fleet.devices.get("a")
        if device_up is not None:
            device_up.stop()
        hub.stop()


def copy_max_bytes(hub: Up, device: str) -> int:
    """The limit of the hub's copy of `device`'s audit, read as the hub's broker (whose
    grant reads each recorded device's copy)."""

    async def read() -> int:
        creds = local_credentials(hub.data_dir, BROKER_USER)
        nc = await natsrpc.connect(hub.state()["nats_url"], name="test", **creds.connect_options())
        try:
            info = await nc.jetstream(timeout=10).stream_info(fleet_stream(device))
            return int(info.config.max_bytes or 0)
        finally:
            await nc.close()

    return asyncio.run(read())


def test_a_copy_limit_is_a_hubs_and_a_size(tmp_path: Path) -> None:
    """--fleet-copy-limit without --leaf-listen, or not a size, or below a stream's
    minimum: a usage error (exit 2) before the data dir is made."""
    data_dir = tmp_path / "data"
    leaf = ["--leaf-listen", f"127.0.0.1:{free_port()}"]
    for args, says in (
        (["--fleet-copy-limit", "8MiB"], "needs --leaf-listen"),
        ([*leaf, "--fleet-copy-limit", "lots"], "want a size"),
        ([*leaf, "--fleet-copy-limit", "1KiB"], "at least"),
    ):
        result = CliRunner().invoke(cli, ["up", "--data-dir", str(data_dir), *args])
        assert result.exit_code == 2, result.output
        assert says in result.output
        assert not data_dir.exists()


def _write(path: Path, text: str, mode: int) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def _all(module: str, label: str, pin_file: str) -> list[str]:
    return [
        "--pkcs11-module", module, "--pkcs11-token-label", label, "--pkcs11-pin-file", pin_file
    ]  # fmt: skip


def _open_pin(p: str) -> str:
    return str(_write(Path(p).with_name("open.pin"), "1234\n", 0o644))


def _empty_pin(p: str) -> str:
    return str(_write(Path(p).with_name("empty.pin"), "", 0o600))


# id: (the options, given a real module M and a good 0600 PIN file P; the reason)
BAD: dict[str, tuple[Callable[[str, str], list[str]], str]] = {
    "module-alone": (lambda m, p: ["--pkcs11-module", m], "pkcs11.options_incomplete"),
    "no-pin-file": (
        lambda m, p: ["--pkcs11-module", m, "--pkcs11-token-label", "edgekms"],
        "pkcs11.options_incomplete",
    ),
    "label-and-pin-only": (
        lambda m, p: ["--pkcs11-token-label", "edgekms", "--pkcs11-pin-file", p],
        "pkcs11.options_incomplete",
    ),
    "module-missing": (lambda m, p: _all(m + ".gone", "edgekms", p), "pkcs11.module_missing"),
    "pin-file-missing": (lambda m, p: _all(m, "edgekms", p + ".gone"), "pkcs11.pin_file_missing"),
    "pin-file-readable-by-others": (
        lambda m, p: _all(m, "edgekms", _open_pin(p)),
        "pkcs11.pin_file_open",
    ),
    "pin-file-empty": (lambda m, p: _all(m, "edgekms", _empty_pin(p)), "pkcs11.pin_file_empty"),
    "label-too-long": (lambda m, p: _all(m, "x" * 33, p), "pkcs11.label_invalid"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_token_option_is_refused_before_anything_starts(case: str, tmp_path: Path) -> None:
    """Exit 3 with the stable reason, and not even the data dir is made: nothing started,
    nothing written, nothing to undo. The PIN is never echoed."""
    from mgmt.softhsm import find_module

    pin_file = _write(tmp_path / "good.pin", "4321\n", 0o600)
    args, reason = BAD[case]
    data_dir = tmp_path / "data"
    result = CliRunner().invoke(
        cli,
        ["up", "--data-dir", str(data_dir), *args(find_module(), str(pin_file))],
    )
    assert result.exit_code == 3, result.output
    assert f"kmsctl: {reason}:" in result.output
    assert "4321" not in result.output and "1234" not in result.output
    assert not data_dir.exists()
    assert stat.S_IMODE(pin_file.stat().st_mode) == 0o600


def test_a_wrong_label_stops_the_stack_with_the_token_named(tokens: Path, tmp_path: Path) -> None:
    """A token that is not there (a board not provisioned yet): hsm0 exits as a token
    refusal and `kmsctl up` stops with that reason instead of restarting it."""
    token = board_token(tokens, "board-real")
    data_dir = tmp_path / "data"
    args = [
        "--pkcs11-module", token.module, "--pkcs11-token-label", "board-unprovisioned",
        "--pkcs11-pin-file", str(token.pin_file),
    ]  # fmt: skip
    with pytest.raises(RuntimeError, match="kmsctl up exited") as exited:
        start_stack(data_dir, *args, timeout=120)
    assert "token refused" in str(exited.value), str(exited.value)
    state = data_dir / "run" / "state.json"
    assert not state.exists() or not json.loads(state.read_text() or "{}").get("ready")
    assert not (data_dir / "softhsm").exists()
    assert token.pin.encode() not in (tmp_path / "data-up.log").read_bytes()


def test_a_systemd_credential_is_taken_whatever_its_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The board's units pass the PIN as a credential (LoadCredential=, `%d/hsm0-pin`):
    a root-owned 0400 file the service's user reads through an ACL, in a directory
    private to the unit. Inside $CREDENTIALS_DIRECTORY owner and mode are not checked;
    the same file anywhere else is still refused."""
    from mgmt.pkcs11token import check_external
    from mgmt.softhsm import find_module

    credentials = tmp_path / "credentials"
    credentials.mkdir()
    pin = _write(credentials / "hsm0-pin", "4321\n", 0o440)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    token = check_external(Path(find_module()), "edgekms", pin)
    assert token is not None and token.pin_file == pin
    outside = _write(tmp_path / "hsm0-pin", "4321\n", 0o440)
    with pytest.raises(InvalidArgument) as refused:
        check_external(Path(find_module()), "edgekms", outside)
    assert refused.value.reason == "pkcs11.pin_file_open"


DATA_DIR_CASES = {
    # id: (what the data dir holds, the token options given, reason)
    "started-on-a-token-now-without": ("record", False, "pkcs11.token_required"),
    "started-on-a-token-now-another": ("record", True, "pkcs11.other_token"),
    "own-softhsm-token-now-an-existing-one": ("softhsm", True, "pkcs11.softhsm_data_dir"),
}


@pytest.mark.parametrize("case", sorted(DATA_DIR_CASES))
def test_a_data_dir_keeps_the_token_it_was_started_on(case: str, tmp_path: Path) -> None:
    """Its key records name keys in that token: another token, or a SoftHSM token made
    in its place, would leave every key missing. Exit 6 holding the lock, before
    anything starts: no nats-server store, no SoftHSM token made, no state."""
    from mgmt.softhsm import find_module

    holds, given, reason = DATA_DIR_CASES[case]
    data_dir = tmp_path / "data"
    if holds == "record":
        (data_dir / "config").mkdir(parents=True)
        record = {"token_label": "board-a", "module": find_module()}
        (data_dir / "config" / "pkcs11-token.json").write_text(json.dumps(record))
    else:
        (data_dir / "softhsm").mkdir(parents=True)
        (data_dir / "softhsm" / "softhsm2.conf").write_text("directories.tokendir = x\n")
    before = sorted(p.relative_to(data_dir) for p in data_dir.rglob("*"))
    pin_file = _write(tmp_path / "good.pin", "4321\n", 0o600)
    args = _all(find_module(), "board-b", str(pin_file)) if given else []
    result = CliRunner().invoke(cli, ["up", "--data-dir", str(data_dir), *args])
    assert result.exit_code == 6, result.output
    assert f"kmsctl: {reason}:" in result.output
    after = sorted(p.relative_to(data_dir) for p in data_dir.rglob("*"))
    assert [p for p in after if p not in before] == [Path("run"), Path("run/up.lock")]
