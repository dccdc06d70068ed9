"""The client config file: where the broker is and which certificate proves who we are.

`kmsctl init` writes it (TOML, paths relative to the file's own directory) and every
client command reads it. Problems with it are the caller's setup, not the KMS's, so they
come out as FailedPrecondition with a hint of what to do, never as a traceback.

    broker = "127.0.0.1:8443"
    server_name = "edgekms-broker"
    ca_cert = "ca.crt"
    cert = "admin.crt"
    key = "admin.key"
    # Optional: more brokers of the same cluster, tried in order after `broker` when it
    # is unavailable (docs/cluster.md, "Clients").
    brokers = ["nas2.lan:8443", "nas3.lan:8443"]

A device whose key is in its TPM (`kmsctl enroll --tpm`) says so, and which TPM:

    key = "device.tss2.pem"     # TPM-wrapped: only that TPM can use it
    key_store = "tpm"           # "file" (the default): key is a PEM private key
    tpm = "/dev/tpmrm0"         # a device or a TCTI string ("swtpm:path=...")

or in a PKCS#11 token (`kmsctl enroll --pkcs11`), named by its RFC 7512 URI, with the
module and where the PIN is (a file, or an environment variable; never the PIN itself):

    key = "pkcs11:token=dev;object=edgekms-device-0a1b;type=private"
    key_store = "pkcs11"
    pkcs11_module = "/usr/lib/softhsm/libsofthsm2.so"
    pin_file = "/etc/edgekms/pin"   # or pin_env = "EDGEKMS_PKCS11_PIN"

KMSClient then dials through edgekms.keytunnel instead of handing grpc the key.
"""

from __future__ import annotations

import logging
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekms.errors import FailedPrecondition

log = logging.getLogger(__name__)

_REQUIRED = ("broker", "ca_cert", "cert", "key")
_KNOWN = (
    *_REQUIRED,
    "server_name",
    "key_store",
    "tpm",
    "pkcs11_module",
    "pin_file",
    "pin_env",
)
KEY_STORES = ("file", "tpm", "pkcs11")
# The most broker addresses one config may list: a cluster has a handful of nodes, and a
# client tries each in turn before giving up.
MAX_BROKERS = 16


@dataclass(frozen=True)
class ClientConfig:
    """A parsed config with absolute paths; the key's bytes are read only when dialing."""

    path: Path
    broker: str
    ca_cert: Path
    cert: Path
    key: Path
    server_name: str | None = None
    # The other brokers of a cluster, in order of preference after `broker`.
    more_brokers: tuple[str, ...] = ()

    @property
    def brokers(self) -> tuple[str, ...]:
        """Every broker address, `broker` first, each once."""
        return tuple(dict.fromkeys((self.broker, *self.more_brokers)))

    key_store: str = "file"
    tpm: str | None = None
    pkcs11_module: str | None = None
    pin_file: Path | None = None
    pin_env: str | None = None

    @property
    def key_uri(self) -> str:
        """The PKCS#11 URI of the key (key_store "pkcs11": `key` is not a path)."""
        return str(self.key)

    def read_credentials(self) -> tuple[bytes, bytes, bytes]:
        """(CA bundle, client certificate chain, client private key) as PEM bytes; for a
        key in a TPM the third is the TPM-wrapped blob, which only the tunnel can use."""
        return (
            _read(self.ca_cert, "ca_cert"),
            _read(self.cert, "cert"),
            _read(self.key, "key"),
        )

    def read_public(self) -> tuple[bytes, bytes]:
        """(CA bundle, client certificate chain): what a key in a TPM or token needs."""
        return _read(self.ca_cert, "ca_cert"), _read(self.cert, "cert")


def _read(path: Path, field: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FailedPrecondition(
            "config.file_missing",
            f"{field} file {path} does not exist (run `kmsctl init` to create it)",
            {"field": field, "path": str(path)},
        ) from None
    except OSError as exc:
        raise FailedPrecondition(
            "config.file_unreadable",
            f"cannot read {field} file {path}: {exc.strerror}",
            {"field": field, "path": str(path)},
        ) from None


def parse_broker(value: str) -> tuple[str, int]:
    """Split "host:port" (or "[v6]:port"); the port is mandatory because there is no default."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FailedPrecondition(
            "config.broker_invalid", f"broker must be host:port, got {value!r}", {"value": value}
        )
    return host.removeprefix("[").removesuffix("]"), int(port)


def parse_client_config(text: str, path: Path) -> ClientConfig:
    """Parse config text as if it were read from `path` (relative paths resolve beside it)."""
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FailedPrecondition(
            "config.invalid", f"{path} is not valid TOML: {exc}", {"path": str(path)}
        ) from None
    missing = [f for f in _REQUIRED if f not in data]
    if missing:
        raise FailedPrecondition(
            "config.field_missing",
            f"{path} lacks {', '.join(missing)} (run `kmsctl init` to rewrite it)",
            {"path": str(path), "fields": ",".join(missing)},
        )
    for field in _KNOWN:
        if field in data and (not isinstance(data[field], str) or not data[field]):
            raise FailedPrecondition(
                "config.field_invalid",
                f"{field} in {path} must be a non-empty string",
                {"path": str(path), "field": field},
            )
    unknown = sorted(set(data) - {*_KNOWN, "brokers"})
    if unknown:
        # Tolerated so that newer `kmsctl init` files still work with an older client.
        log.warning("config.unknown_fields path=%s fields=%s", path, ",".join(unknown))
    parse_broker(data["broker"])
    more = _more_brokers(data.get("brokers", []), path)
    key_store = data.get("key_store", "file")
    if key_store not in KEY_STORES:
        raise FailedPrecondition(
            "config.field_invalid",
            f"key_store in {path} must be one of {', '.join(KEY_STORES)}",
            {"path": str(path), "field": "key_store"},
        )
    if key_store == "pkcs11" and (
        not data.get("pkcs11_module") or not str(data["key"]).startswith("pkcs11:")
    ):
        raise FailedPrecondition(
            "config.field_invalid",
            f"{path}: a PKCS#11 key needs pkcs11_module and a pkcs11: URI as key",
            {"path": str(path), "field": "pkcs11_module"},
        )
    base = path.parent

    def resolve(field: str) -> Path:
        p = Path(data[field]).expanduser()
        return p if p.is_absolute() else base / p

    return ClientConfig(
        path=path,
        broker=data["broker"],
        ca_cert=resolve("ca_cert"),
        cert=resolve("cert"),
        key=Path(data["key"]) if key_store == "pkcs11" else resolve("key"),
        server_name=data.get("server_name"),
        more_brokers=more,
        key_store=key_store,
        tpm=data.get("tpm"),
        pkcs11_module=data.get("pkcs11_module"),
        pin_file=resolve("pin_file") if "pin_file" in data else None,
        pin_env=data.get("pin_env"),
    )


def _more_brokers(value: object, path: Path) -> tuple[str, ...]:
    """`brokers`: a list of at most MAX_BROKERS host:port strings."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FailedPrecondition(
            "config.field_invalid",
            f"brokers in {path} must be a list of host:port strings",
            {"path": str(path), "field": "brokers"},
        )
    if len(value) > MAX_BROKERS:
        raise FailedPrecondition(
            "config.field_invalid",
            f"brokers in {path} lists {len(value)} addresses; at most {MAX_BROKERS}",
            {"path": str(path), "field": "brokers"},
        )
    for item in value:
        parse_broker(item)
    return tuple(value)


def load_client_config(path: Path) -> ClientConfig:
    """Read and check the config; a FailedPrecondition says what is wrong and how to fix it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FailedPrecondition(
            "config.missing",
            f"no client config at {path}: run `kmsctl init` first (or pass --config)",
            {"path": str(path)},
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FailedPrecondition(
            "config.unreadable", f"cannot read client config {path}: {exc}", {"path": str(path)}
        ) from None
    config = parse_client_config(text, path)
    try:
        if config.key_store == "pkcs11":
            raise OSError("not a file")
        mode = config.key.stat().st_mode
    except OSError:
        pass  # reported with a clear error when the key is read
    else:
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning(
                "config.key_permissions path=%s mode=%o hint=chmod_600", config.key, mode & 0o777
            )
    return config


__all__ = ["ClientConfig", "load_client_config", "parse_broker", "parse_client_config"]
