"""A service's side of bus authentication: the credentials its config names, and how to
present them to nats-server (user, password, own inbox prefix, TLS trusting the bus CA).

Every service needs this and nothing else of the bus security model; the server side
(permission tables, bcrypt hashes, the bus CA) lives in mgmt.natsauth, which `kmsctl up`
uses and which re-exports these names. Keeping them apart keeps x509 and the management
code out of each service's memory.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekms.errors import FailedPrecondition

INBOX_ROOT = "_INBOX"
USER_RE_PATTERN = r"^[a-z][a-z0-9_-]{0,47}$"


def inbox_prefix(user: str) -> str:
    """The reply-subject prefix of one identity; only that identity may subscribe below it."""
    return f"{INBOX_ROOT}.{user}"


def read_password(path: Path) -> str:
    try:
        password = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        problem = getattr(exc, "strerror", None) or type(exc).__name__
        raise FailedPrecondition(
            "bus.credentials_unreadable", f"cannot read the bus password file {path}: {problem}"
        ) from None
    if not password:
        raise FailedPrecondition("bus.credentials_empty", f"the bus password file {path} is empty")
    return password


@dataclass(frozen=True)
class BusCredentials:
    """How one service authenticates to the bus; all None: an open bus (tests, development)."""

    user: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for nats.connect (user, password, inbox prefix, TLS context)."""
        options: dict[str, Any] = dict(self.extra)
        if self.user is not None:
            if self.password_file is None:
                raise FailedPrecondition(
                    "bus.credentials_incomplete", f"bus user {self.user!r} has no password file"
                )
            options["user"] = self.user
            options["password"] = read_password(self.password_file)
            options["inbox_prefix"] = inbox_prefix(self.user)
        if self.ca_file is not None:
            options["tls"] = client_tls_context(self.ca_file)
        return options


def client_tls_context(ca_file: Path) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise FailedPrecondition(
            "bus.ca_unreadable", f"cannot load the bus CA {ca_file}: {exc}"
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def parse_bus_fields(
    table: dict[str, Any], base: Path | None = None
) -> tuple[BusCredentials, list[str]]:
    """Read nats_user / nats_password_file / nats_ca from a service config table.

    Returns the credentials and a list of problems ("field: what is wrong") for the
    caller to raise as its own ConfigError, so each config keeps one error type.
    """
    problems: list[str] = []
    values: dict[str, str] = {}
    for name in ("nats_user", "nats_password_file", "nats_ca"):
        if name in table:
            value = table[name]
            if not isinstance(value, str) or not value:
                problems.append(f"{name}: must be a non-empty string")
            else:
                values[name] = value
    user = values.get("nats_user")
    if user is not None and not re.match(USER_RE_PATTERN, user):
        problems.append(f"nats_user: {user!r} must match {USER_RE_PATTERN}")
    if ("nats_user" in values) != ("nats_password_file" in values):
        problems.append("nats_user/nats_password_file: give both or neither")

    def resolve(name: str) -> Path | None:
        if name not in values:
            return None
        path = Path(values[name]).expanduser()
        return path if path.is_absolute() or base is None else base / path

    creds = BusCredentials(user, resolve("nats_password_file"), resolve("nats_ca"))
    return creds, problems
