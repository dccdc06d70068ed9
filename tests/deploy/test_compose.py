"""compose.yaml checked without a Docker engine: its structure with pyyaml, `docker
compose config` where the CLI has the plugin, the NATS per-service permissions on a
real nats-server configured by the setup one-shot (run for real, SoftHSM included)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from nats.errors import TimeoutError as NatsTimeoutError

from edgekms import natsrpc
from mgmt import natsauth
from mgmt.natsserver import find_binary, free_port, wait_for_port
from mgmt.softhsm import token_exists
from tests.deploy.engine import compose_command

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
CONFIG_DIR = ROOT / "docker" / "config"
PROVIDERS = ("hsm0", "tpm0")

LONG_RUNNING = {"nats", "crypto-hsm", "swtpm", "crypto-tpm", "ca", "broker"}
ONE_SHOT = {"setup", "init"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def test_services_and_one_shots(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == LONG_RUNNING | ONE_SHOT
    for name in ONE_SHOT:
        assert services[name]["restart"] == "no", name
    for name in LONG_RUNNING:
        assert services[name]["restart"] == "on-failure", name


def test_every_long_running_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    for name in LONG_RUNNING:
        check = compose["services"][name]["healthcheck"]
        assert check["test"][0] == "CMD" and len(check["test"]) > 1, name
        assert check["retries"] >= 3


def test_start_order_needs_no_healthcheck_scheduler(compose: dict[str, Any]) -> None:
    """podman without systemd never runs healthchecks, so no start may wait on one:
    one-shots are waited for by exit status, services only by their start (each role
    then waits for its own dependencies, docker/wait.py)."""
    services = compose["services"]

    def needs(name: str) -> dict[str, str]:
        return {d: c["condition"] for d, c in services[name].get("depends_on", {}).items()}

    for name in services:
        for dep, condition in needs(name).items():
            assert dep in services, (name, dep)
            expected = "service_completed_successfully" if dep in ONE_SHOT else "service_started"
            assert condition == expected, (name, dep)
    assert needs("nats") == {"setup": "service_completed_successfully"}
    # The ceremony signs through crypto-hsm, so it runs after it; the broker needs its output.
    assert needs("crypto-hsm") == {"nats": "service_started"}
    assert needs("init") == {"nats": "service_started", "crypto-hsm": "service_started"}
    assert {"nats", "swtpm"} <= set(needs("crypto-tpm"))
    assert {"init", "crypto-hsm", "crypto-tpm", "ca"} <= set(needs("broker"))


# What each role waits for before it starts (docker/entrypoint.sh).
WAITS = {
    "nats": ["file:$DATA/nats/nats.conf"],
    "init": ["tcp:$NATS_HOSTPORT"],
    "crypto-hsm": ["tcp:$NATS_HOSTPORT"],
    "crypto-tpm": ["tcp:$NATS_HOSTPORT"],
    "ca": ["tcp:$NATS_HOSTPORT"],
    "broker": ["file:$DATA/broker/pki/internal-ca.crt", "tcp:$NATS_HOSTPORT"],
}


def test_every_role_waits_for_its_dependencies_itself() -> None:
    text = ENTRYPOINT.read_text()
    for role, targets in WAITS.items():
        body = text.split(f"\n{role})\n", 1)[1].split("\n    ;;", 1)[0]
        waits = [line for line in body.splitlines() if '"$WAIT"' in line]
        assert waits, role
        for target in targets:
            assert f'"{target}"' in waits[0], (role, target)


def load_wait() -> Any:
    import importlib.machinery
    import importlib.util

    path = ROOT / "docker" / "wait.py"
    loader = importlib.machinery.SourceFileLoader("edgekms_wait", str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_wait_returns_once_its_targets_are_there(tmp_path: Path) -> None:
    import socket

    wait = load_wait()
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        (tmp_path / "ready").write_text("x")
        argv = ["edgekms-wait", "--timeout", "30", f"file:{tmp_path / 'ready'}"]
        assert wait.main([*argv, f"tcp:127.0.0.1:{port}"]) == 0


def test_wait_gives_up_at_its_deadline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wait = load_wait()
    missing = tmp_path / "never"
    assert wait.main(["edgekms-wait", "--timeout", "0.5", f"file:{missing}"]) == 1
    assert f"pending=file:{missing}" in capsys.readouterr().err
    assert wait.main(["edgekms-wait", "nonsense"]) == 64


def test_no_privileges_and_only_loopback_ports(compose: dict[str, Any]) -> None:
    published: list[str] = []
    for name, service in compose["services"].items():
        assert not service.get("privileged", False), name
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert service.get("read_only") is True, name
        assert "devices" not in service and "network_mode" not in service, name
        published += service.get("ports", [])
    assert sorted(published) == [
        "127.0.0.1:${EDGEKMS_BROKER_PORT:-8443}:8443",
        "127.0.0.1:${EDGEKMS_CA_PORT:-8080}:8080",
    ]


def test_volumes_are_declared_and_state_is_shared(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith((".", "/", "$")):
                assert source in declared, (name, source)
            else:
                local = source.split("}", 1)[-1] if source.startswith("$") else source
                if local.startswith("./docker"):
                    assert (ROOT / local).exists(), local


# Which per-service volumes each container mounts, and how (docs/deploy.md).
MOUNTS = {
    "nats": {"edgekms-nats": "rw", "edgekms-public": "ro"},
    "crypto-hsm": {"edgekms-hsm0": "rw", "edgekms-public": "ro"},
    "crypto-tpm": {"edgekms-tpm0": "rw", "edgekms-swtpm": "rw", "edgekms-public": "ro"},
    # swtpm's sockets: the only way to the TPM, shared by these two alone.
    "swtpm": {"edgekms-swtpm": "rw"},
    "ca": {"edgekms-ca": "ro", "edgekms-public": "ro"},
    # The audit archive (issue 21): written by the broker's archiver, nothing secret in it.
    "broker": {"edgekms-broker": "ro", "edgekms-public": "ro", "edgekms-audit-archive": "rw"},
    "init": {"edgekms-init": "rw", "edgekms-broker": "rw", "edgekms-public": "ro"},
}


def named_mounts(service: dict[str, Any]) -> dict[str, str]:
    out = {}
    for volume in service.get("volumes", []):
        parts = volume.split(":")
        if parts[0].startswith("edgekms-"):
            assert parts[1] == "/var/lib/edgekms/" + parts[0].removeprefix("edgekms-")
            out[parts[0]] = parts[2] if len(parts) > 2 else "rw"
    return out


def test_each_service_mounts_only_its_own_secrets(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, expected in MOUNTS.items():
        assert named_mounts(services[name]) == expected, name
    # Only setup sees every secret volume, and only setup sees the master secrets. The
    # audit archive holds no secret (entries and public checkpoints): the broker's alone.
    assert set(named_mounts(services["setup"])) == {
        v
        for v in compose["volumes"]
        if v.startswith("edgekms-") and v not in ("edgekms-swtpm", "edgekms-audit-archive")
    }
    archivers = [n for n, s in services.items() if "edgekms-audit-archive" in named_mounts(s)]
    assert archivers == ["broker"]
    holders = [n for n, s in services.items() if "edgekms-setup" in named_mounts(s)]
    assert holders == ["setup"]


def test_every_role_the_compose_file_runs_exists_in_the_entrypoint(
    compose: dict[str, Any],
) -> None:
    roles = set(re.findall(r"^(\S+)\)$", ENTRYPOINT.read_text(), re.M))
    used = {
        s["command"][0]
        for s in compose["services"].values()
        if s.get("image") == "edgekms:dev" and "command" in s
    }
    assert used == {"setup", "nats", "init", "crypto-hsm", "crypto-tpm", "ca", "broker"}
    assert used <= roles
    for check in compose["services"].values():
        test = check.get("healthcheck", {}).get("test", [])
        if "/usr/local/bin/edgekms-healthcheck" in test:
            assert test[-1] in roles


def test_dockerfiles_exist_and_drop_root() -> None:
    for dockerfile in ("Dockerfile", "swtpm.Dockerfile"):
        text = (ROOT / "docker" / dockerfile).read_text()
        assert re.search(r"^USER (?!root)\S+", text, re.M), dockerfile
        assert "rm -rf /var/lib/apt/lists/*" in text


COMPOSE_CLI = compose_command(os.environ)


@pytest.mark.skipif(COMPOSE_CLI is None, reason="no compose CLI (docker compose, docker-compose)")
def test_the_compose_cli_accepts_the_file() -> None:
    """The CLI that runs the stack (v2 plugin, or Debian's docker-compose 1.29, which
    rejects a top-level `name:`) validates it; no engine is needed for that."""
    assert COMPOSE_CLI is not None
    result = subprocess.run(
        [*COMPOSE_CLI, "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "name" not in yaml.safe_load(COMPOSE.read_text())


# --- the setup one-shot, for real, and the bus it configures ----------------------


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data volume after the setup role ran twice (it must be idempotent)."""
    if shutil.which("softhsm2-util") is None:
        pytest.skip("softhsm2 is not installed")
    data = tmp_path_factory.mktemp("compose-data")
    env = {
        **os.environ,
        "EDGEKMS_DATA_DIR": str(data),
        "EDGEKMS_SETUP": str(ROOT / "deploy" / "edgekms-setup"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    outputs = []
    for _ in range(2):
        result = subprocess.run(
            ["sh", str(ENTRYPOINT), "setup"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout + result.stderr)
        if _ == 0:
            first = {p.name: p.read_bytes() for p in (data / "setup" / "nats").iterdir()}
    assert first == {p.name: p.read_bytes() for p in (data / "setup" / "nats").iterdir()}
    pin = (data / "hsm0" / "pin").read_text().strip()
    for output in outputs:
        assert pin not in output
        for password in first.values():
            assert password.decode().strip() not in output
    return data


# Each service's volume gets exactly its own bus password (and hsm0 its PIN).
VOLUME_PASSWORDS = {
    "hsm0": natsauth.crypto_user("hsm0"),
    "tpm0": natsauth.crypto_user("tpm0"),
    "ca": natsauth.CA_USER,
    "broker": natsauth.BROKER_USER,
    "init": natsauth.KMSCTL_USER,
}


def test_setup_makes_private_secrets_and_the_token(setup_dir: Path) -> None:
    passwords = {p.name for p in (setup_dir / "setup" / "nats").iterdir()}
    users = {"broker", "ca", "kmsctl", *(natsauth.crypto_user(p) for p in PROVIDERS)}
    assert passwords == {f"{u}.password" for u in users}
    for secret in [
        *(setup_dir / "setup" / "nats").iterdir(),
        setup_dir / "hsm0" / "pin",
        setup_dir / "nats" / "nats.conf",
        setup_dir / "nats" / "nats-server.key",
    ]:
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert token_exists(setup_dir / "hsm0" / "softhsm" / "softhsm2.conf", "edgekms")
    conf = (setup_dir / "nats" / "nats.conf").read_text()
    for path in (setup_dir / "setup" / "nats").iterdir():
        assert path.read_text().strip() not in conf  # only bcrypt hashes reach the config
    assert str(setup_dir / "nats" / "nats-server.key") in conf


def test_setup_hands_each_volume_only_its_own_secret(setup_dir: Path) -> None:
    master = setup_dir / "setup" / "nats"
    for volume, user in VOLUME_PASSWORDS.items():
        files = sorted(p.name for p in (setup_dir / volume).iterdir() if p.is_file())
        expected = ["nats.password", "pin"] if volume == "hsm0" else ["nats.password"]
        assert files == expected, volume
        own = (setup_dir / volume / "nats.password").read_bytes()
        assert own == (master / f"{user}.password").read_bytes(), volume
    assert not any((setup_dir / "public").glob("*.key"))
    assert sorted(p.name for p in (setup_dir / "nats").iterdir() if p.is_file()) == [
        "nats-server.key",
        "nats.conf",
    ]


def test_container_configs_name_the_setup_credentials(setup_dir: Path) -> None:
    expected = {
        "crypto-hsm0.toml": natsauth.crypto_user("hsm0"),
        "crypto-tpm0.toml": natsauth.crypto_user("tpm0"),
        "broker.toml": natsauth.BROKER_USER,
        "ca.toml": natsauth.CA_USER,
    }
    for name, user in expected.items():
        settings = tomllib.loads((CONFIG_DIR / name).read_text())
        creds, problems = natsauth.parse_bus_fields(settings)
        assert problems == [] and creds.user == user, name
        assert settings["nats_url"] == "tls://nats:4222"
        assert creds.password_file is not None and creds.ca_file is not None
        local = setup_dir / creds.password_file.relative_to("/var/lib/edgekms")
        assert local.read_bytes() == natsauth.password_path(setup_dir / "setup", user).read_bytes()
        assert (setup_dir / creds.ca_file.relative_to("/var/lib/edgekms")).is_file()


@pytest.fixture(scope="module")
def stack_nats(setup_dir: Path) -> Any:
    """nats-server on the config the setup role wrote; flags move it to a free loopback port."""
    port = free_port()
    log_path = setup_dir / "nats.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed after the server stops
    process = subprocess.Popen(
        [
            find_binary(),
            "-c",
            str(setup_dir / "nats" / "nats.conf"),
            "-a",
            "127.0.0.1",
            "-p",
            str(port),
            "-m",
            str(free_port()),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port("127.0.0.1", port, 15, process, log_path)
        yield port
    finally:
        process.terminate()
        process.wait(10)
        log.close()


async def connect(setup_dir: Path, port: int, user: str, errors: list[Exception]) -> Any:
    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    creds = natsauth.BusCredentials(
        user,
        natsauth.password_path(setup_dir / "setup", user),
        setup_dir / "public" / "bus-ca.crt",
    )
    return await nats.connect(
        f"tls://127.0.0.1:{port}",
        error_cb=on_error,
        allow_reconnect=False,
        max_reconnect_attempts=0,
        connect_timeout=5,
        **creds.connect_options(),
    )


async def test_bus_users_have_only_their_subjects(setup_dir: Path, stack_nats: int) -> None:
    errors: list[Exception] = []
    hsm0 = await connect(setup_dir, stack_nats, natsauth.crypto_user("hsm0"), errors)
    broker = await connect(setup_dir, stack_nats, natsauth.BROKER_USER, errors)
    try:

        async def answer(msg: Any) -> None:
            await msg.respond(b"signed:" + msg.data)

        await hsm0.subscribe("kms.crypto.hsm0.Sign", queue="kms.crypto.hsm0", cb=answer)
        await natsrpc.subscriptions_live(hsm0)
        reply = await broker.request("kms.crypto.hsm0.Sign", b"digest", timeout=5)
        assert reply.data == b"signed:digest"

        # hsm0 may not listen on tpm0's subjects, nor ask anybody anything. The
        # subscription answers like the one above, so that, were it granted, the
        # broker's request below would get this answer instead of no responders.
        await hsm0.subscribe("kms.crypto.tpm0.Sign", queue="kms.crypto.tpm0", cb=answer)
        await hsm0.publish("kms.ca.Issue", b"x")
        await hsm0.flush()
        for _ in range(600):  # up to 30 s for both errors to arrive
            if len(errors) >= 2:
                break
            await asyncio.sleep(0.05)
        text = " ".join(str(e) for e in errors).lower()
        assert 'permissions violation for subscription to "kms.crypto.tpm0.sign"' in text
        assert 'permissions violation for publish to "kms.ca.issue"' in text
        with pytest.raises((NatsTimeoutError, nats.errors.NoRespondersError)):
            await broker.request("kms.crypto.tpm0.Sign", b"digest", timeout=2)
    finally:
        await hsm0.close()
        await broker.close()


async def test_bus_refuses_a_wrong_password(setup_dir: Path, stack_nats: int) -> None:
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    with pytest.raises(Exception) as refused:
        await asyncio.wait_for(
            nats.connect(
                f"tls://127.0.0.1:{stack_nats}",
                user=natsauth.BROKER_USER,
                password="not-the-password",
                tls=natsauth.client_tls_context(setup_dir / "public" / "bus-ca.crt"),
                error_cb=on_error,
                allow_reconnect=False,
                max_reconnect_attempts=0,
                connect_timeout=5,
            ),
            10,
        )
    assert not isinstance(refused.value, TimeoutError)
    assert "authorization" in " ".join(str(e) for e in [refused.value, *errors]).lower()


def test_entrypoint_refuses_an_unknown_role() -> None:
    result = subprocess.run(
        ["sh", str(ENTRYPOINT), "bogus"], capture_output=True, text=True, timeout=10, check=False
    )
    assert result.returncode == 64 and "usage" in result.stderr


def load_healthcheck() -> Any:
    import importlib.machinery
    import importlib.util

    path = ROOT / "docker" / "healthcheck.py"
    loader = importlib.machinery.SourceFileLoader("edgekms_healthcheck", str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_crypto_healthcheck_sees_a_live_bus_connection_and_its_end() -> None:
    import socket

    health = load_healthcheck()
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert not health.established_to(port)
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        peer, _ = server.accept()
        try:
            assert health.established_to(port)
        finally:
            client.close()
            peer.close()
        assert not health.established_to(port)
    assert health.bus_port(CONFIG_DIR / "crypto-hsm0.toml") == 4222
    assert health.bus_port(CONFIG_DIR / "crypto-tpm0.toml") == 4222


def test_the_compose_broker_archives_where_it_may_write(compose: dict[str, Any]) -> None:
    """Issue 21 in the compose stack: the broker's config names an archive dir, that dir
    is a writable volume of the broker's (its other volumes are read-only and so is its
    root file system), and the image makes the mount point the unprivileged user's, so
    the named volume starts out writable by it."""
    config = tomllib.loads((CONFIG_DIR / "broker.toml").read_text())
    archive = config["audit_archive_dir"]
    assert archive == "/var/lib/edgekms/audit-archive"
    broker = compose["services"]["broker"]
    assert broker.get("read_only", compose["x-edgekms"]["read_only"]) is True
    mounts = {v.split(":")[1]: v for v in broker["volumes"]}
    assert archive in mounts and not mounts[archive].endswith(":ro")
    made = re.search(
        r"install -d -o edgekms -g edgekms -m 0700 ([^&]+)&&",
        (ROOT / "docker" / "Dockerfile").read_text().replace("\\\n", " "),
    )
    assert made is not None and archive in made.group(1).split()
    from broker.config import load_config

    assert load_config(CONFIG_DIR / "broker.toml").audit_archive_dir == Path(archive)
