"""The crypto service's TOML configuration: one file per provider, read once at start.

The file names the provider, the bus and exactly one token section ([pkcs11] or [tpm2]).
Secrets never live in it: the PIN comes from a file or an environment variable the file
names, so the config itself can be world-readable and kept in version control.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekms.audit import AUDIT_FIELDS, StreamLimit, parse_limit_fields
from edgekms.busauth import BusCredentials, parse_bus_fields
from edgekms.kvstore import parse_replicas
from edgekms.metrics import LISTEN_FIELD, parse_listen_field
from edgekms.subjects import PROVIDER_ID_RE

if TYPE_CHECKING:
    from crypto_service.providers.base import Provider

log = logging.getLogger(__name__)

DEFAULT_SESSIONS = 4
MAX_SESSIONS = 64
MAX_WORKERS = 64


class ConfigError(Exception):
    """The config file is missing, unparsable, or a field is wrong; the message names both."""


@dataclass(frozen=True)
class Pkcs11Config:
    module: str
    token_label: str
    pin_file: Path | None = None
    pin_env: str | None = None
    sessions: int = DEFAULT_SESSIONS


@dataclass(frozen=True)
class Tpm2Config:
    """Plain on purpose: the TPM provider's author extends it with typed fields."""

    tcti: str
    state_dir: Path
    extra: dict[str, Any] = field(default_factory=dict)
    # Persistent SRK to use (e.g. 0x81000001); None: a transient ECC P-256 SRK per connection.
    srk_handle: int | None = None
    # File holding the auth value of keys created with require_auth (1..32 bytes).
    key_auth_file: Path | None = None
    # Hierarchy auth set by `kmsctl tpm provision`: the owner's for the storage key (a
    # primary under the owner hierarchy), the endorsement's for the attestation key.
    # None: empty auth, the state of a TPM nobody provisioned.
    owner_auth_file: Path | None = None
    endorsement_auth_file: Path | None = None


@dataclass(frozen=True)
class ServiceConfig:
    provider_id: str
    nats_url: str
    workers: int
    pkcs11: Pkcs11Config | None = None
    tpm2: Tpm2Config | None = None
    source: Path | None = None
    # This service's bus identity (nats_user, nats_password_file, nats_ca); empty: open bus.
    bus: BusCredentials = field(default_factory=BusCredentials)
    # Its audit stream's limits where it creates that stream itself (no `kmsctl up`: the
    # board); None: edgekms.audit's defaults (1 GiB). docs/security.md, "Sizing for a board".
    audit_limit: StreamLimit | None = None
    # Copies of its audit stream where it creates that stream (a cluster: 3).
    replicas: int = 1
    # Where /metrics, /healthz and /readyz are served (edgekms.metrics); None: nowhere.
    metrics_listen: str | None = None

    @property
    def kind(self) -> str:
        return "pkcs11" if self.pkcs11 is not None else "tpm2"


_BUS_KEYS = {"nats_user", "nats_password_file", "nats_ca"}
_TOP_KEYS = {
    "provider_id",
    "nats_url",
    "workers",
    "pkcs11",
    "tpm2",
    "replicas",
    LISTEN_FIELD,
    *_BUS_KEYS,
    *AUDIT_FIELDS,
}
_PKCS11_KEYS = {"module", "token_label", "pin_file", "pin_env", "sessions"}


def load_config(path: Path) -> ServiceConfig:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, path)


def parse_config(data: dict[str, Any], path: Path | None = None) -> ServiceConfig:
    where = str(path) if path is not None else "<config>"

    def fail(field_name: str, problem: str) -> ConfigError:
        return ConfigError(f"{where}: {field_name}: {problem}")

    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise fail(unknown[0], "unknown field")
    provider_id = _str(data, "provider_id", fail, required=True)
    if not PROVIDER_ID_RE.match(provider_id):
        raise fail("provider_id", f"{provider_id!r} must match {PROVIDER_ID_RE.pattern}")
    nats_url = _str(data, "nats_url", fail, required=True)
    if not nats_url.startswith(("nats://", "tls://")):
        raise fail("nats_url", "must start with nats:// or tls://")

    has_pkcs11 = "pkcs11" in data
    has_tpm2 = "tpm2" in data
    if has_pkcs11 == has_tpm2:
        raise fail("pkcs11/tpm2", "exactly one of [pkcs11] or [tpm2] is required")

    pkcs11: Pkcs11Config | None = None
    tpm2: Tpm2Config | None = None
    if has_pkcs11:
        pkcs11 = _parse_pkcs11(data["pkcs11"], fail)
        default_workers = pkcs11.sessions
    else:
        tpm2 = _parse_tpm2(data["tpm2"], fail)
        default_workers = 1
    workers = _int(data, "workers", fail, default_workers, 1, MAX_WORKERS)
    bus, problems = parse_bus_fields(data, path.parent if path is not None else None)
    if problems:
        name, _, problem = problems[0].partition(": ")
        raise fail(name, problem)
    audit_limit, problems = parse_limit_fields(data)
    if problems:
        name, _, problem = problems[0].partition(": ")
        raise fail(name, problem)
    replicas, problems = parse_replicas(data)
    if problems:
        name, _, problem = problems[0].partition(": ")
        raise fail(name, problem)
    metrics_listen, problems = parse_listen_field(data)
    if problems:
        name, _, problem = problems[0].partition(": ")
        raise fail(name, problem)
    return ServiceConfig(
        provider_id,
        nats_url,
        workers,
        pkcs11,
        tpm2,
        path,
        bus,
        audit_limit,
        replicas=replicas,
        metrics_listen=metrics_listen,
    )


Fail = Callable[[str, str], ConfigError]


def _section(value: Any, name: str, fail: Fail) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise fail(name, "must be a table")
    return value


def _str(data: dict[str, Any], key: str, fail: Fail, *, required: bool, prefix: str = "") -> str:
    name = prefix + key
    if key not in data:
        if required:
            raise fail(name, "is required")
        return ""
    value = data[key]
    if not isinstance(value, str) or not value:
        raise fail(name, "must be a non-empty string")
    return value


def _int(data: dict[str, Any], key: str, fail: Fail, default: int, lo: int, hi: int) -> int:
    if key not in data:
        return default
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise fail(key, f"must be an integer from {lo} to {hi}")
    return value


def _parse_pkcs11(value: Any, fail: Fail) -> Pkcs11Config:
    section = _section(value, "pkcs11", fail)
    unknown = sorted(set(section) - _PKCS11_KEYS)
    if unknown:
        raise fail(f"pkcs11.{unknown[0]}", "unknown field")
    module = _str(section, "module", fail, required=True, prefix="pkcs11.")
    label = _str(section, "token_label", fail, required=True, prefix="pkcs11.")
    pin_file = _str(section, "pin_file", fail, required=False, prefix="pkcs11.")
    pin_env = _str(section, "pin_env", fail, required=False, prefix="pkcs11.")
    if bool(pin_file) == bool(pin_env):
        raise fail("pkcs11.pin_file/pin_env", "exactly one of pin_file or pin_env is required")

    def sessions_fail(_: str, problem: str) -> ConfigError:
        return fail("pkcs11.sessions", problem)

    sessions = _int(section, "sessions", sessions_fail, DEFAULT_SESSIONS, 1, MAX_SESSIONS)
    return Pkcs11Config(
        module=module,
        token_label=label,
        pin_file=Path(pin_file) if pin_file else None,
        pin_env=pin_env or None,
        sessions=sessions,
    )


def _parse_tpm2(value: Any, fail: Fail) -> Tpm2Config:
    section = dict(_section(value, "tpm2", fail))
    tcti = _str(section, "tcti", fail, required=True, prefix="tpm2.")
    state_dir = _str(section, "state_dir", fail, required=True, prefix="tpm2.")
    srk_handle = _int(section, "srk_handle", fail, 0, 0x81000000, 0x81FFFFFF) or None
    key_auth_file = _str(section, "key_auth_file", fail, required=False, prefix="tpm2.")
    owner = _str(section, "owner_auth_file", fail, required=False, prefix="tpm2.")
    endorsement = _str(section, "endorsement_auth_file", fail, required=False, prefix="tpm2.")
    typed = (
        "tcti",
        "state_dir",
        "srk_handle",
        "key_auth_file",
        "owner_auth_file",
        "endorsement_auth_file",
    )
    extra = {k: v for k, v in section.items() if k not in typed}
    return Tpm2Config(
        tcti=tcti,
        state_dir=Path(state_dir),
        extra=extra,
        srk_handle=srk_handle,
        key_auth_file=Path(key_auth_file) if key_auth_file else None,
        owner_auth_file=Path(owner) if owner else None,
        endorsement_auth_file=Path(endorsement) if endorsement else None,
    )


def read_pin(config: Pkcs11Config) -> str:
    """The user PIN from the file or variable the config names; one trailing newline dropped."""
    if config.pin_file is not None:
        try:
            pin = config.pin_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problem = getattr(exc, "strerror", None) or type(exc).__name__
            raise ConfigError(
                f"pkcs11.pin_file: cannot read {config.pin_file}: {problem}"
            ) from None
        source = f"file {config.pin_file}"
    else:
        assert config.pin_env is not None
        env_pin = os.environ.get(config.pin_env)
        if env_pin is None:
            raise ConfigError(f"pkcs11.pin_env: environment variable {config.pin_env} is not set")
        pin = env_pin
        source = f"environment variable {config.pin_env}"
    if pin.endswith("\n"):
        pin = pin[:-1]
        if pin.endswith("\r"):
            pin = pin[:-1]
    if not pin:
        raise ConfigError(f"pkcs11: the PIN in {source} is empty")
    return pin


def make_provider(config: ServiceConfig) -> Provider:
    """The provider the config names, opened and logged in; errors are typed KMSErrors."""
    if config.pkcs11 is not None:
        from crypto_service.providers.pkcs11 import Pkcs11Provider

        return Pkcs11Provider(config.pkcs11, read_pin(config.pkcs11))
    assert config.tpm2 is not None
    from crypto_service.providers.tpm2 import Tpm2Provider  # type: ignore[import-not-found]

    provider: Provider = Tpm2Provider(config.tpm2)
    return provider
