"""The agent's TOML file: which certificates and CRL files to keep, where, how.

    client_config = "client/config.toml"   # the KMS client config (broker, CA, our cert)
    state_file = "agent-state.json"        # each item's next due time (`kmsctl agent status`)
    renew_at = 0.667                       # renew at this fraction of a lifetime
    crl_max_interval_seconds = 3600        # fetch every CRL at least this often
    min_interval_seconds = 5               # never two passes over one item closer than this
    retry_initial_seconds = 5              # first retry after a failure, then doubling
    retry_max_seconds = 600                # ... up to this (each with jitter)
    exec_timeout_seconds = 60              # a reload command running longer is killed

    [identity]                             # optional: the client certificate client_config
    renew_at = 0.667                       # names, renewed over mutual TLS with itself
    rekey = false                          # true: a new key at each renewal
    exec = ["systemctl", "restart", "my-kms-client"]

    [[cert]]
    name = "nginx"
    profile = "https-server"
    common_name = "nas.home.arpa"
    sans = ["dns:nas.home.arpa", "ip:192.168.1.10"]
    ttl = "90d"                            # optional: the lifetime asked for
    key_type = "ec-p256"
    cert = "/etc/nginx/tls/nas.crt"
    key = "/etc/nginx/tls/nas.key"
    chain = "/etc/nginx/tls/chain.pem"     # optional
    fullchain = true                       # the cert file holds the chain too (nginx)
    owner = "root"                         # optional user and group (name or number)
    group = "www-data"
    cert_mode = "0644"
    key_mode = "0640"                      # never readable or writable by others
    rekey = false                          # true: a new key at each renewal
    exec = ["systemctl", "reload", "nginx"]

    [[crl]]
    name = "openvpn"
    path = "/etc/openvpn/server/crl.pem"
    format = "pem"                         # pem: every issuing CA's CRL; der: the current one
    exec = ["systemctl", "reload", "openvpn-server@server"]

Relative paths are relative to this file. A `exec` string is split like a shell would
(shlex) but never run by one: a reload command runs as an argv, so nothing in a file name
is interpreted; a command that needs a shell says so (`["/bin/sh", "-c", "..."]`). The
command sees the item in its environment (EDGEKMS_AGENT_ITEM, EDGEKMS_AGENT_CERT, ...),
never a secret: keys are in files, and argv is visible to every local user.

Every refusal is InvalidArgument `agent.config_invalid` whose message and details name
the file and the key (`cert[2].key_mode`), or the line for TOML syntax errors; nothing
runs on a config that does not load, and SIGHUP with a broken file keeps the old one.
"""

from __future__ import annotations

import datetime
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekms.algorithms import KEY_TYPE_BY_CLI
from edgekms.durations import parse_ttl
from edgekms.errors import InvalidArgument

REASON = "agent.config_invalid"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
PROFILE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# Many entries are plausible (a NAS with a certificate per service); tens of thousands
# are not, and each is a file pair and a schedule entry.
MAX_ITEMS = 256
MAX_SANS = 100
MAX_EXEC_ARGS = 64
DEFAULT_RENEW_AT = 2 / 3
# Tiny fractions are for tests with short lifetimes; min_interval_seconds keeps even
# those from renewing in a tight loop.
MIN_RENEW_AT = 0.001

TOP_KEYS = frozenset(
    {
        "client_config",
        "state_file",
        "renew_at",
        "crl_max_interval_seconds",
        "min_interval_seconds",
        "retry_initial_seconds",
        "retry_max_seconds",
        "exec_timeout_seconds",
        "identity",
        "cert",
        "crl",
    }
)
CERT_KEYS = frozenset(
    {
        "name",
        "profile",
        "common_name",
        "sans",
        "ttl",
        "key_type",
        "cert",
        "key",
        "chain",
        "fullchain",
        "owner",
        "group",
        "cert_mode",
        "key_mode",
        "exec",
        "renew_at",
        "rekey",
    }
)
IDENTITY_KEYS = frozenset({"renew_at", "rekey", "exec"})
IDENTITY_NAME = "identity"
CRL_KEYS = frozenset({"name", "path", "format", "owner", "group", "mode", "exec"})


@dataclass(frozen=True)
class FileOwner:
    """Who owns a written file: None keeps the agent's own user or group."""

    user: str | int | None = None
    group: str | int | None = None


@dataclass(frozen=True)
class CertItem:
    """One certificate the agent keeps: its key, certificate and chain files."""

    name: str
    profile: str
    cert: Path
    key: Path
    common_name: str = ""
    sans: tuple[str, ...] = ()
    ttl: datetime.timedelta | None = None
    key_type: str = "ec-p256"
    chain: Path | None = None
    fullchain: bool = False
    owner: FileOwner = field(default_factory=FileOwner)
    cert_mode: int = 0o644
    key_mode: int = 0o600
    exec: tuple[str, ...] = ()
    renew_at: float = DEFAULT_RENEW_AT
    rekey: bool = False

    kind = "cert"


@dataclass(frozen=True)
class IdentityItem:
    """The agent's own client certificate (the files client_config names), renewed by
    itself over mutual TLS (ClientService.RenewClient)."""

    client_config: Path
    renew_at: float = DEFAULT_RENEW_AT
    rekey: bool = False
    exec: tuple[str, ...] = ()

    kind = "identity"
    name = IDENTITY_NAME


@dataclass(frozen=True)
class CrlItem:
    """One CRL file the agent keeps (OpenVPN's crl-verify, nginx's ssl_crl)."""

    name: str
    path: Path
    format: str = "pem"
    owner: FileOwner = field(default_factory=FileOwner)
    mode: int = 0o644
    exec: tuple[str, ...] = ()

    kind = "crl"


@dataclass(frozen=True)
class AgentConfig:
    path: Path
    client_config: Path
    state_file: Path
    identity: IdentityItem | None = None
    certs: tuple[CertItem, ...] = ()
    crls: tuple[CrlItem, ...] = ()
    renew_at: float = DEFAULT_RENEW_AT
    crl_max_interval: float = 3600.0
    min_interval: float = 5.0
    retry_initial: float = 5.0
    retry_max: float = 600.0
    exec_timeout: float = 60.0

    @property
    def items(self) -> tuple[IdentityItem | CertItem | CrlItem, ...]:
        first: tuple[IdentityItem, ...] = (self.identity,) if self.identity else ()
        return (*first, *self.certs, *self.crls)


def _bad(path: Path, key: str, message: str) -> InvalidArgument:
    return InvalidArgument(REASON, f"{path}: {key}: {message}", {"file": str(path), "key": key})


class _Reader:
    """Typed access to one table, naming `where` (e.g. "cert[1]") in every refusal."""

    def __init__(self, path: Path, where: str, table: dict[str, Any], known: frozenset[str]):
        self.path = path
        self.where = where
        self.table = table
        unknown = sorted(set(table) - known)
        if unknown:
            raise self.bad(unknown[0], "unknown key (a typo?)")

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def bad(self, name: str, message: str) -> InvalidArgument:
        return _bad(self.path, self.key(name), message)

    def string(self, name: str, default: str | None = None) -> str:
        value = self.table.get(name, default)
        if value is None:
            raise self.bad(name, "missing")
        if not isinstance(value, str):
            raise self.bad(name, "must be a string")
        if "\0" in value or "\n" in value:
            raise self.bad(name, "must be one line")
        return value

    def path_of(self, name: str, required: bool = True) -> Path | None:
        if name not in self.table and not required:
            return None
        value = self.string(name)
        if not value:
            raise self.bad(name, "must name a file")
        target = Path(value)
        return target if target.is_absolute() else self.path.parent / target

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = self.table.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.bad(name, "must be a number")
        if not low <= value <= high:
            raise self.bad(name, f"must be between {low:g} and {high:g}")
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.table.get(name, default)
        if not isinstance(value, bool):
            raise self.bad(name, "must be true or false")
        return value

    def mode(self, name: str, default: int) -> int:
        value = self.table.get(name)
        if value is None:
            return default
        if not isinstance(value, str) or not re.fullmatch(r"0?[0-7]{3}", value):
            raise self.bad(name, 'must be an octal string like "0644"')
        return int(value, 8)

    def owner(self) -> FileOwner:
        found: list[str | int | None] = []
        for name in ("owner", "group"):
            value = self.table.get(name)
            if value is not None and not (
                (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32)
                or (isinstance(value, str) and re.fullmatch(r"[a-z_][a-z0-9_.-]{0,31}\$?", value))
            ):
                raise self.bad(name, "must be a user or group name, or a number")
            found.append(value)
        return FileOwner(found[0], found[1])

    def command(self) -> tuple[str, ...]:
        value = self.table.get("exec")
        if value is None:
            return ()
        if isinstance(value, str):
            try:
                argv = shlex.split(value)
            except ValueError as exc:
                raise self.bad("exec", f"cannot be split into words: {exc}") from None
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            argv = list(value)
        else:
            raise self.bad("exec", "must be a command line or a list of strings")
        if not argv or not argv[0]:
            raise self.bad("exec", "names no program")
        if len(argv) > MAX_EXEC_ARGS or any("\0" in a for a in argv):
            raise self.bad("exec", f"at most {MAX_EXEC_ARGS} arguments, no NUL bytes")
        return tuple(argv)

    def name(self, seen: set[str]) -> str:
        name = self.string("name")
        if not NAME_RE.match(name):
            raise self.bad("name", "lower-case letters, digits, '.', '_' and '-', 1..64")
        if name in seen:
            raise self.bad("name", f"{name!r} is used twice")
        seen.add(name)
        return name


def _tables(path: Path, raw: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise _bad(path, key, f"must be [[{key}]] tables")
    return value


def _cert_item(reader: _Reader, seen: set[str], renew_at: float) -> CertItem:
    name = reader.name(seen)
    profile = reader.string("profile")
    if not PROFILE_RE.match(profile):
        raise reader.bad("profile", "is not a profile name")
    sans_raw = reader.table.get("sans", [])
    if not isinstance(sans_raw, list) or not all(isinstance(s, str) and s for s in sans_raw):
        raise reader.bad("sans", 'must be a list like ["dns:nas.home.arpa", "ip:10.0.0.1"]')
    if len(sans_raw) > MAX_SANS:
        raise reader.bad("sans", f"at most {MAX_SANS}")
    for san in sans_raw:
        kind, sep, value = san.partition(":")
        if not sep or kind not in ("dns", "ip", "email", "uri") or not value:
            raise reader.bad("sans", f"{san!r}: write dns:, ip:, email: or uri: and a value")
    common_name = reader.string("common_name", "")
    if not common_name and not sans_raw:
        raise reader.bad("common_name", "a certificate needs a common_name or sans")
    ttl = None
    if "ttl" in reader.table:
        try:
            ttl = parse_ttl(reader.string("ttl"))
        except InvalidArgument as exc:
            raise reader.bad("ttl", exc.message) from None
    key_type = reader.string("key_type", "ec-p256")
    # A certificate's key signs: the symmetric type (aes-256) is no choice here.
    certifiable = [name for name, info in KEY_TYPE_BY_CLI.items() if info.family != "aes"]
    if key_type not in certifiable:
        raise reader.bad("key_type", f"one of {', '.join(certifiable)}")
    key_mode = reader.mode("key_mode", 0o600)
    if key_mode & 0o037:
        raise reader.bad("key_mode", "a key must not be writable by its group or open to others")
    cert = reader.path_of("cert")
    key = reader.path_of("key")
    assert cert is not None and key is not None
    if cert == key:
        raise reader.bad("key", "must be another file than cert")
    rekey = reader.boolean("rekey", False)
    return CertItem(
        name=name,
        profile=profile,
        cert=cert,
        key=key,
        common_name=common_name,
        sans=tuple(sans_raw),
        ttl=ttl,
        key_type=key_type,
        chain=reader.path_of("chain", required=False),
        fullchain=reader.boolean("fullchain", False),
        owner=reader.owner(),
        cert_mode=reader.mode("cert_mode", 0o644),
        key_mode=key_mode,
        exec=reader.command(),
        renew_at=reader.number("renew_at", renew_at, MIN_RENEW_AT, 0.95),
        rekey=rekey,
    )


def _crl_item(reader: _Reader, seen: set[str]) -> CrlItem:
    name = reader.name(seen)
    fmt = reader.string("format", "pem")
    if fmt not in ("pem", "der"):
        raise reader.bad("format", 'must be "pem" or "der"')
    path = reader.path_of("path")
    assert path is not None
    return CrlItem(
        name=name,
        path=path,
        format=fmt,
        owner=reader.owner(),
        mode=reader.mode("mode", 0o644),
        exec=reader.command(),
    )


def parse_config(text: str, path: Path) -> AgentConfig:
    """The config in `text`, as if read from `path`; InvalidArgument naming the key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message carries "(at line N, column M)".
        raise InvalidArgument(
            REASON, f"{path}: not valid TOML: {exc}", {"file": str(path)}
        ) from None
    top = _Reader(path, "", raw, TOP_KEYS)
    client_config = top.path_of("client_config")
    state_file = top.path_of("state_file", required=False) or path.parent / "agent-state.json"
    assert client_config is not None
    renew_at = top.number("renew_at", DEFAULT_RENEW_AT, MIN_RENEW_AT, 0.95)
    retry_initial = top.number("retry_initial_seconds", 5, 0.1, 3600)
    retry_max = top.number("retry_max_seconds", 600, 1, 86400)
    if retry_max < retry_initial:
        raise top.bad("retry_max_seconds", "must not be below retry_initial_seconds")
    min_interval = top.number("min_interval_seconds", 5, 1, 3600)
    crl_max = top.number("crl_max_interval_seconds", 3600, 10, 7 * 86400)
    if crl_max < min_interval:
        raise top.bad("crl_max_interval_seconds", "must not be below min_interval_seconds")
    identity = None
    if "identity" in raw:
        table = raw["identity"]
        if not isinstance(table, dict):
            raise top.bad("identity", "must be an [identity] table")
        reader = _Reader(path, "identity", table, IDENTITY_KEYS)
        identity = IdentityItem(
            client_config=client_config,
            renew_at=reader.number("renew_at", renew_at, MIN_RENEW_AT, 0.95),
            rekey=reader.boolean("rekey", False),
            exec=reader.command(),
        )
    seen: set[str] = {IDENTITY_NAME}
    cert_tables = _tables(path, raw, "cert")
    crl_tables = _tables(path, raw, "crl")
    if len(cert_tables) + len(crl_tables) > MAX_ITEMS:
        raise _bad(path, "cert", f"at most {MAX_ITEMS} items in all")
    certs = tuple(
        _cert_item(_Reader(path, f"cert[{i}]", t, CERT_KEYS), seen, renew_at)
        for i, t in enumerate(cert_tables)
    )
    crls = tuple(
        _crl_item(_Reader(path, f"crl[{i}]", t, CRL_KEYS), seen) for i, t in enumerate(crl_tables)
    )
    if not certs and not crls and identity is None:
        raise _bad(path, "cert", "nothing to keep: add [identity], [[cert]] or [[crl]]")
    _check_distinct_files(path, certs, crls, state_file)
    return AgentConfig(
        path=path,
        client_config=client_config,
        state_file=state_file,
        certs=certs,
        crls=crls,
        identity=identity,
        renew_at=renew_at,
        crl_max_interval=crl_max,
        min_interval=min_interval,
        retry_initial=retry_initial,
        retry_max=retry_max,
        exec_timeout=top.number("exec_timeout_seconds", 60, 1, 3600),
    )


def _check_distinct_files(
    path: Path, certs: tuple[CertItem, ...], crls: tuple[CrlItem, ...], state_file: Path
) -> None:
    """Two items writing one file would undo each other on every pass."""
    owners: dict[Path, str] = {state_file: "state_file"}
    for i, cert in enumerate(certs):
        for label, target in (("cert", cert.cert), ("key", cert.key), ("chain", cert.chain)):
            if target is None:
                continue
            key = f"cert[{i}].{label}"
            if target in owners:
                raise _bad(path, key, f"{target} is also written by {owners[target]}")
            owners[target] = key
    for i, crl in enumerate(crls):
        key = f"crl[{i}].path"
        if crl.path in owners:
            raise _bad(path, key, f"{crl.path} is also written by {owners[crl.path]}")
        owners[crl.path] = key


def load_config(path: Path) -> AgentConfig:
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidArgument(
            REASON, f"{path}: cannot read: {exc.strerror}", {"file": str(path)}
        ) from None
    except UnicodeDecodeError:
        raise InvalidArgument(REASON, f"{path}: not UTF-8 text", {"file": str(path)}) from None
    return parse_config(text, path)
