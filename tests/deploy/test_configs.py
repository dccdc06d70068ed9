"""Every shipped deployment file checked against the code that reads it, so they cannot drift.

Each TOML under docker/config/ and deploy/ is loaded by the real loader of its kind; every
`kmsctl` / `kms-*` / `edgekms-setup` command line in docker/entrypoint.sh and the yocto
units is parsed by the real click command (or argparse parser) without running it; every
secret a board config names is a credential its unit loads, and the board's setup unit,
run for real on a temporary root, makes every file those credentials come from.
"""

from __future__ import annotations

import configparser
import importlib.machinery
import importlib.util
import re
import shlex
import stat
import string
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import click
import pytest

from broker import __main__ as broker_main
from broker.config import load_config as load_broker
from ca_service.config import load_serve_config
from crypto_service import __main__ as crypto_main
from crypto_service.config import load_config as load_crypto
from mgmt import natsauth
from mgmt.cli import cli as kmsctl

ROOT = Path(__file__).resolve().parents[2]
DOCKER_CONFIG = ROOT / "docker" / "config"
BOARD_CONFIG = ROOT / "deploy"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
SETUP_SCRIPT = ROOT / "deploy" / "edgekms-setup"
UNITS = ROOT / "yocto-layer" / "recipes-edgekms" / "edgekms" / "files"

# The values the entrypoint's variables take in the image (see its defaults).
ENTRYPOINT_VARS = {
    "DATA": "/var/lib/edgekms",
    "CONF": "/etc/edgekms",
    "SETUP": "/usr/local/bin/edgekms-setup",
    "NATS_URL": "tls://nats:4222",
    "CA_PROVIDER": "hsm0",
    "BROKER_ADDRESS": "127.0.0.1:8443",
    "SWTPM_SOCK": "/var/lib/edgekms/swtpm/swtpm.sock",
}
UNIT_DIRS = {
    "@BINDIR@": "/usr/bin",
    "@SYSCONFDIR@": "/etc",
    "@LOCALSTATEDIR@": "/var",
    "@LIBEXECDIR@": "/usr/libexec",
}
CLICK_COMMANDS: dict[str, click.Command] = {
    "kmsctl": kmsctl,
    "kms-crypto": crypto_main.main,
    "kms-broker": broker_main.main,
}


def loader_for(path: Path) -> Any:
    if path.name.startswith("crypto-"):
        return load_crypto
    if path.name == "broker.toml":
        return load_broker
    if path.name == "ca.toml":
        return load_serve_config
    raise AssertionError(f"{path}: no loader known for this config")


SHIPPED = sorted([*DOCKER_CONFIG.glob("*.toml"), *BOARD_CONFIG.glob("*.toml")])


def test_every_kind_is_shipped_for_both_shapes() -> None:
    kinds = {"crypto-hsm0.toml", "crypto-tpm0.toml", "broker.toml", "ca.toml"}
    assert {p.name for p in DOCKER_CONFIG.glob("*.toml")} == kinds
    assert {p.name for p in BOARD_CONFIG.glob("*.toml")} == kinds


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_loads_with_the_real_loader(path: Path) -> None:
    config = loader_for(path)(path)
    # Every service joins the bus as its own identity, over TLS.
    assert config.nats_url.startswith("tls://"), path
    expected_user = {
        "crypto-hsm0.toml": natsauth.crypto_user("hsm0"),
        "crypto-tpm0.toml": natsauth.crypto_user("tpm0"),
        "broker.toml": natsauth.BROKER_USER,
        "ca.toml": natsauth.CA_USER,
    }[path.name]
    assert config.bus.user == expected_user
    assert config.bus.password_file is not None and config.bus.password_file.is_absolute()
    assert config.bus.ca_file is not None and config.bus.ca_file.name == "bus-ca.crt"


# The broker and CA loaders ignore fields they do not know, so a stale field (the CA's
# old `state_dir` and `[http]` table) would load silently: the keys are checked here.
KNOWN_KEYS = {
    "broker.toml": {
        "listen", "nats_url", "default_provider", "providers", "sign_timeout",
        "generate_timeout", "tls", "nats_user", "nats_password_file", "nats_ca", "ca",
        "audit_max_bytes", "audit_max_msgs", "audit_archive_dir", "audit_window",
        "audit_max_age", "audit_archive_interval",
    },
    "ca.toml": {
        "nats_url", "http_listen", "base_url", "profiles_file", "nats_user",
        "nats_password_file", "nats_ca", "audit_max_bytes", "audit_max_msgs",
    },
}  # fmt: skip


@pytest.mark.parametrize("shape", [DOCKER_CONFIG, BOARD_CONFIG], ids=["docker", "deploy"])
def test_broker_and_ca_configs_carry_only_fields_their_loader_reads(shape: Path) -> None:
    for name, known in KNOWN_KEYS.items():
        keys = set(tomllib.loads((shape / name).read_text()))
        assert keys <= known, (shape.name, name, sorted(keys - known))
    broker_tls = tomllib.loads((shape / "broker.toml").read_text())["tls"]
    assert set(broker_tls) == {"cert", "key", "client_ca"}


def test_crypto_configs_name_their_provider_and_token() -> None:
    for shape in (DOCKER_CONFIG, BOARD_CONFIG):
        hsm = load_crypto(shape / "crypto-hsm0.toml")
        assert hsm.provider_id == "hsm0" and hsm.pkcs11 is not None
        assert hsm.pkcs11.pin_file is not None and hsm.pkcs11.pin_env is None
        tpm = load_crypto(shape / "crypto-tpm0.toml")
        assert tpm.provider_id == "tpm0" and tpm.tpm2 is not None


def test_a_stale_field_would_be_refused() -> None:
    """The check above has teeth: the loaders refuse what the old files carried."""
    from crypto_service.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="state_dir"):
        parse_config(
            {"provider_id": "hsm0", "nats_url": "tls://x:1", "state_dir": "/x", "pkcs11": {}}
        )
    from ca_service.config import CAConfigError

    with pytest.raises(CAConfigError, match="http_listen"):
        load_serve_config(_write_toml('nats_url = "tls://x:1"\nhttp_listen = "8080"\n'))


def _write_toml(text: str) -> Path:
    import tempfile

    handle = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)  # noqa: SIM115
    with handle:
        handle.write(text)
    return Path(handle.name)


# --- command lines ---------------------------------------------------------------------


def parse_click(argv: list[str]) -> click.Context:
    """Parse argv with the real click command, down to the leaf subcommand; run nothing."""
    name = Path(argv[0]).name
    command = CLICK_COMMANDS[name]
    ctx = command.make_context(name, argv[1:])
    while isinstance(command, click.Group):
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        if not rest and command.invoke_without_command:
            break  # a group that runs itself (`kmsctl agent --config ...`)
        sub_name, sub, sub_args = command.resolve_command(ctx, rest)
        assert sub is not None and sub_name is not None, argv
        command = sub
        ctx = sub.make_context(sub_name, sub_args, parent=ctx)
    return ctx


def setup_module_from_script() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("edgekms_setup_script", str(SETUP_SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def entrypoint_commands() -> list[list[str]]:
    text = re.sub(r"\\\n\s*", " ", ENTRYPOINT.read_text())
    commands = []
    for line in text.splitlines():
        line = line.strip()
        line = re.sub(r"^(exec|until)\s+", "", line)
        line = re.sub(r";\s*do$", "", line)
        first = line.split(" ", 1)[0]
        if first in CLICK_COMMANDS or (first == "python3" and '"$SETUP"' in line):
            tokens = [t for t in shlex.split(line) if t != "$@"]
            commands.append([string.Template(t).substitute(ENTRYPOINT_VARS) for t in tokens])
    return commands


def test_entrypoint_command_lines_parse() -> None:
    commands = entrypoint_commands()
    seen = {" ".join(c[:3]) if c[0] == "kmsctl" else Path(c[0]).name for c in commands}
    assert seen >= {
        "kmsctl init --data-dir",
        "kmsctl ca serve",
        "kmsctl tpm provision",
        "kms-crypto",
        "kms-broker",
    }
    for argv in commands:
        if argv[0] == "python3":
            args = setup_module_from_script().build_parser().parse_args(argv[2:])
            assert args.ca_provider == "hsm0"
            continue
        ctx = parse_click(argv)
        if ctx.info_name == "init":
            params = ctx.params
            assert params["nats_user"] == natsauth.KMSCTL_USER
            assert str(params["nats_password_file"]) == "/var/lib/edgekms/init/nats.password"
            assert str(params["nats_ca"]) == "/var/lib/edgekms/public/bus-ca.crt"
            assert params["provider"] == "hsm0"
        if ctx.info_name == "provision":
            # The TPM it provisions is the one crypto-tpm0 uses, and its auth files land
            # where that config reads them.
            tpm2 = tomllib.loads((DOCKER_CONFIG / "crypto-tpm0.toml").read_text())["tpm2"]
            assert ctx.params["tpm"] == tpm2["tcti"]
            secrets = Path(ctx.params["data_dir"]) / "secrets"
            assert Path(tpm2["owner_auth_file"]) == secrets / "tpm-owner.auth"
            assert Path(tpm2["endorsement_auth_file"]) == secrets / "tpm-endorsement.auth"
        if ctx.info_name in ("kms-crypto", "kms-broker", "serve"):
            config = Path(ctx.params["config_path"])
            assert (DOCKER_CONFIG / config.name).is_file(), argv
            assert config.parent == Path("/etc/edgekms")


def test_command_parsing_has_teeth() -> None:
    with pytest.raises(click.NoSuchOption):
        parse_click(["kmsctl", "init", "--data-dir", "/x", "--broker-config", "/y"])


def read_unit(name: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    text = (UNITS / name).read_text()
    for token, value in UNIT_DIRS.items():
        text = text.replace(token, value)
    # Repeated keys (LoadCredential=) are kept: each value on its own line.
    unit.read_string(_join_repeated(text))
    return unit


def _join_repeated(text: str) -> str:
    out: list[str] = []
    seen: dict[tuple[str, str], int] = {}
    section = ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line
        match = re.match(r"^(LoadCredential)=(.*)$", line)
        if match:
            key = (section, match.group(1))
            if key in seen:
                out[seen[key]] += "\n  " + match.group(2)
                continue
            seen[key] = len(out)
        out.append(line)
    return "\n".join(out) + "\n"


def credentials(name: str) -> dict[str, Path]:
    service = read_unit(name)["Service"]
    loaded = {}
    for entry in service.get("LoadCredential", "").split():
        cred, _, source = entry.partition(":")
        loaded[cred] = Path(source)
    return loaded


def unit_argv(name: str) -> list[str]:
    line = read_unit(name)["Service"]["ExecStart"]
    return shlex.split(line.replace("%d", f"/run/credentials/{name}"))


BOARD_UNITS = {
    "crypto-hsm0.toml": "edgekms-crypto-hsm0.service",
    "crypto-tpm0.toml": "edgekms-crypto-tpm0.service",
    "broker.toml": "edgekms-broker.service",
    "ca.toml": "edgekms-ca.service",
}


# Units that run the layer's own shell scripts (tests/deploy/test_yocto_layer.py checks them).
SHELL_UNITS = {"edgekms-datafs.service", "edgekms-provision.service"}
# `kmsctl up` units whose bundle and credentials exist only on a board of that role:
# test_yocto_layer.py::test_role_unit_runs_kmsctl_up_on_the_boards_token parses them with
# stand-ins for those files.
ROLE_UNITS = {
    "edgekms-node.service",
    "edgekms-fleet-hub.service",
    "edgekms-fleet-device.service",
}


def test_unit_command_lines_parse() -> None:
    units = sorted(
        p.name for p in UNITS.glob("*.service") if p.name not in SHELL_UNITS | ROLE_UNITS
    )
    parsed = 0
    for name in units:
        argv = unit_argv(name)
        if Path(argv[0]).name in CLICK_COMMANDS:
            ctx = parse_click(argv)
            parsed += 1
            if "config_path" in ctx.params:
                config = Path(ctx.params["config_path"])
                assert config.parent == Path("/etc/edgekms")
                assert {**BOARD_UNITS, "agent.toml": "edgekms-agent.service"}[config.name] == name
            if ctx.info_name == "init":
                password = Path(ctx.params["nats_password_file"])
                assert password.parent == Path(f"/run/credentials/{name}")
                source = credentials(name)[password.name]
                assert source.name == f"{natsauth.KMSCTL_USER}.password"
        elif Path(argv[1]).name == "edgekms-setup":
            setup_module_from_script().build_parser().parse_args(argv[2:])
            parsed += 1
    assert parsed == len(units) - 1  # all but nats-server, checked below


def test_board_secrets_are_the_credentials_their_unit_loads() -> None:
    for conf, unit in BOARD_UNITS.items():
        config = loader_for(BOARD_CONFIG / conf)(BOARD_CONFIG / conf)
        loaded = credentials(unit)
        named = [config.bus.password_file]
        if conf == "crypto-hsm0.toml":
            named.append(config.pkcs11.pin_file)
        if conf == "broker.toml":
            named += [config.tls.cert, config.tls.key, config.tls.client_ca]
        for path in named:
            assert path.parent == Path(f"/run/credentials/{unit}"), (conf, path)
            assert path.name in loaded, (conf, path.name)
        user = config.bus.user
        assert loaded["nats-password"] == Path(f"/var/lib/edgekms/secrets/nats/{user}.password")


def test_board_setup_makes_every_credential_source(tmp_path: Path) -> None:
    """edgekms-setup.service's own command, on a temporary root: afterwards every
    LoadCredential= source of every unit but the ceremony's outputs exists."""
    argv = unit_argv("edgekms-setup.service")
    assert Path(argv[0]).name == "python3"
    args = [a.replace("/var/lib/edgekms", str(tmp_path)) for a in argv[2:]]
    result = subprocess.run(
        [sys.executable, str(SETUP_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for name in sorted(p.name for p in UNITS.glob("*.service")):
        for source in credentials(name).values():
            # The ceremony makes the broker's; the hsm0 PIN is the operator's (OP-TEE token)
            # and so is a fleet device's uplink bundle (from the hub, via provisioning).
            if "/init/pki/" in str(source) or source.name in ("hsm0.pin", "uplink.toml"):
                continue
            local = tmp_path / source.relative_to("/var/lib/edgekms")
            assert local.is_file(), (name, source)
            assert stat.S_IMODE(local.stat().st_mode) == 0o600, local
    conf = (tmp_path / "secrets" / "nats.conf").read_text()
    assert '"/run/credentials/edgekms-nats.service/nats-server.key"' in conf
    assert 'host: "127.0.0.1"' in conf
    # The store's cap on the board's data partition (docs/security.md, "Sizing for a board").
    assert "  max_file_store: 167772160\n" in conf
    assert re.search(r'"user": "ca"', conf)
    for password in (tmp_path / "secrets" / "nats").iterdir():
        assert password.read_text().strip() not in conf
        assert password.read_text().strip() not in result.stderr
    nats_unit = read_unit("edgekms-nats.service")["Service"]
    assert nats_unit["ExecStart"].endswith("-c %d/nats.conf")
    assert set(credentials("edgekms-nats.service")) == {"nats.conf", "nats-server.key"}


def test_the_board_broker_archives_where_its_unit_may_write() -> None:
    """On the board the audit streams are kept to their window only if the broker can
    write its archive: the config names a dir, and the broker's unit makes it and may
    write there (ProtectSystem=strict leaves everything else read-only)."""
    config = load_broker(BOARD_CONFIG / "broker.toml")
    assert config.audit_archive_dir == Path("/var/lib/edgekms/audit-archive")
    service = read_unit("edgekms-broker.service")["Service"]
    assert service["StateDirectory"] == "edgekms/audit-archive"
    assert str(config.audit_archive_dir) in service["ReadWritePaths"].split()
