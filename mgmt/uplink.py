"""A fleet hub's device records and a device's uplink bundle (docs/cluster.md, "Fleet").

At the hub, `kmsctl fleet add-device D` records D under DATA_DIR/fleet/devices/<D>.json
(its id and the audit writers its stack runs), makes D's hub bus user password
(DATA_DIR/secrets/nats/leaf-<D>.password, like every other bus user's) and writes D's
uplink bundle: one 0600 TOML file with the device id, the hub's leaf address, that
password and the CA certificate the device checks the hub's leaf TLS against. The hub's
`kmsctl up --leaf-listen` reads the records: one narrow bus user per device
(mgmt.fleet.device_identity), the hub copy of each device's audit (edgekms.fleet
.source_device) and the broker's read of it.

On the device, `kmsctl up --uplink BUNDLE` copies the bundle into DATA_DIR/secrets once
(a data dir is one device for good: another device's bundle is refused) and runs the
device's own stack in its JetStream domain with the leaf remote. The password lives in
0600 files and the nats-server config only: never in argv, never in a log.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from edgekms.errors import FailedPrecondition, InvalidArgument, NotFound
from edgekms.fleet import check_device
from edgekms.fleet_ca import DeviceRecord as RegistryRecord
from edgekms.subjects import PROVIDER_ID_RE
from mgmt.fleet import device_user
from mgmt.natsauth import (
    BusTLS,
    audit_writers,
    ensure_bus_tls,
    ensure_passwords,
    read_password,
)
from mgmt.pki import write_private

# A bundle is a few hundred bytes of TOML and one certificate: anything larger is not one.
MAX_BUNDLE_BYTES = 64 * 1024
# A device record: its writers and up to 64 names of up to 253 characters.
MAX_RECORD_BYTES = 64 * 1024
# Where the device keeps its installed bundle, under its secrets dir.
INSTALLED_NAME = "uplink.toml"
# The hub's JetStream domain: a device's is dev-<id>, so the two never meet.
HUB_DOMAIN = "hub"


def _bundle_invalid(where: Path, why: str) -> InvalidArgument:
    return InvalidArgument("fleet.bundle_invalid", f"{where}: {why}", {"path": str(where)[:200]})


def check_address(address: str, what: str = "hub address") -> tuple[str, int]:
    """host:port (a bracketed IPv6 host too), else InvalidArgument fleet.address_invalid."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if (
        not sep
        or not host
        or not port.isdigit()
        or not 0 < int(port) < 65536
        or any(c in host for c in "/@ \"'")
        or len(address) > 300
    ):
        raise InvalidArgument("fleet.address_invalid", f"{what} {address[:80]!r}: want HOST:PORT")
    return host, int(port)


# --- the hub: device records ------------------------------------------------------------


# What a device may ask the hub's CA for when `kmsctl fleet add-device` is given names
# but no --profile: a TLS server certificate for its own names.
DEFAULT_DEVICE_PROFILES = ("https-server",)


@dataclass(frozen=True)
class DeviceRecord:
    """One device of the hub's fleet: its id, the audit writers its stack runs (the
    hub's copy sources one stream per writer), and the names (`dns:`/`ip:`) and
    profiles it may ask the hub's CA for (none: no certificate at all)."""

    device: str
    writers: tuple[str, ...]
    names: tuple[str, ...] = ()
    profiles: tuple[str, ...] = ()

    def registry_record(self) -> RegistryRecord:
        """Its entry in the hub's device registry (edgekms.fleet_ca), which the hub's CA
        reads; checked there (fleet.names_invalid, fleet.profile_invalid)."""
        return RegistryRecord(self.device, self.names, self.profiles, enabled=True)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "device": self.device,
                "writers": list(self.writers),
                "names": list(self.names),
                "profiles": list(self.profiles),
            }
        ).encode()


def devices_dir(data_dir: Path) -> Path:
    return data_dir / "fleet" / "devices"


def removed_dir(data_dir: Path) -> Path:
    """Records of removed devices: no hub user any more, but the broker still reads
    the hub's copy of their audit (evidence outlives the device)."""
    return data_dir / "fleet" / "removed"


def leaf_tls(data_dir: Path, names: tuple[str, ...] = ()) -> BusTLS:
    """The hub's leaf listener certificate and the CA devices check it against: a CA of
    its own (DATA_DIR/nats/leaf-tls, keys in DATA_DIR/secrets/leaf), so a device learns
    nothing of the hub's bus CA. Made on first use with `names` and loopback; a later
    name the certificate lacks gets a new certificate from the same CA, so every bundle
    already handed out stays good (a running hub takes it at its next reload)."""
    tls_dir, secrets_dir = data_dir / "nats" / "leaf-tls", data_dir / "secrets" / "leaf"
    secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    want = tuple(dict.fromkeys(n for n in (*names, "127.0.0.1", "localhost") if n))
    paths = ensure_bus_tls(tls_dir, secrets_dir, want)
    have = _cert_names(paths.server_cert)
    missing = [n for n in want if n not in have]
    if missing:
        paths.server_cert.unlink()
        paths = ensure_bus_tls(tls_dir, secrets_dir, tuple(dict.fromkeys([*have, *want])))
    return paths


def _cert_names(cert_path: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    dns = san.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return [*dns, *ips]


def _allowed(
    device: str,
    old: DeviceRecord | None,
    names: tuple[str, ...] | None,
    profiles: tuple[str, ...] | None,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Names and profiles as the registry keeps them (DNS names lower-cased, no
    duplicates), checked by the registry's own record. None keeps the old record's;
    profiles default to DEFAULT_DEVICE_PROFILES once there are names."""
    if names is None:
        names = old.names if old is not None else ()
    names = tuple(dict.fromkeys(n.lower() if n.startswith("dns:") else n for n in names))
    if profiles is None:
        profiles = old.profiles if old is not None and old.profiles else ()
        if not profiles and names:
            profiles = DEFAULT_DEVICE_PROFILES
    profiles = tuple(dict.fromkeys(profiles))
    RegistryRecord(device, names, profiles)
    return names, profiles


def add_device(
    data_dir: Path,
    device: str,
    hub_address: str,
    providers: tuple[str, ...] = ("hsm0",),
    names: tuple[str, ...] | None = None,
    profiles: tuple[str, ...] | None = None,
) -> tuple[DeviceRecord, str, BusTLS]:
    """Record `device` at the hub (once: again with the same writers keeps its names
    unless new ones are given; a device is re-added with other writers only after
    remove_device) and return its record, its hub password and the leaf TLS. Nothing is
    written when an argument is bad."""
    check_device(device)
    host, _ = check_address(hub_address)
    bad = [p for p in providers if not PROVIDER_ID_RE.match(p)]
    if bad or not providers:
        raise InvalidArgument(
            "bus.provider_invalid", f"{str(bad[:1])[:60]} is not a list of provider ids"
        )
    writers = audit_writers(providers)
    path = devices_dir(data_dir) / f"{device}.json"
    old = read_record(path) if path.exists() else None
    if old is not None and old.writers != tuple(writers):
        raise FailedPrecondition(
            "fleet.device_exists",
            f"device {device!r} is in the fleet with writers {', '.join(old.writers)}: "
            "remove it first to change them",
            {"device": device},
        )
    allowed, allowed_profiles = _allowed(device, old, names, profiles)
    record = DeviceRecord(device, tuple(writers), allowed, allowed_profiles)
    tls = leaf_tls(data_dir, (host,))
    secrets_dir = data_dir / "secrets"
    secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    password_file = ensure_passwords(secrets_dir, [device_user(device)])[device_user(device)]
    devices_dir(data_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    if old != record:
        _write_record(path, record)
    # Added again after a removal: a device of the fleet once more.
    (removed_dir(data_dir) / f"{device}.json").unlink(missing_ok=True)
    return record, read_password(password_file), tls


def _write_record(path: Path, record: DeviceRecord) -> None:
    """Replace the record whole (a reader never sees half of one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    write_private(tmp, record.to_json())
    tmp.replace(path)


def set_allowed(
    data_dir: Path,
    device: str,
    names: tuple[str, ...] | None,
    profiles: tuple[str, ...] | None = None,
) -> DeviceRecord:
    """Replace what `device` may ask the hub's CA for: its names and its profiles (None
    keeps what it had). A running hub writes the
    registry within seconds; certificates already issued stay valid until revoked."""
    check_device(device)
    path = devices_dir(data_dir) / f"{device}.json"
    if not path.exists():
        raise NotFound("fleet.device_unknown", f"no device {device!r} in this hub's fleet")
    old = read_record(path)
    allowed, allowed_profiles = _allowed(device, old, names, profiles)
    record = DeviceRecord(device, old.writers, allowed, allowed_profiles)
    if record != old:
        _write_record(path, record)
    return record


def remove_device(data_dir: Path, device: str) -> None:
    """Take `device` out of the fleet: its hub password goes (a bundle already handed out
    no longer logs in once the hub reloads) and its record moves to fleet/removed. The
    hub's copy of its audit is kept: it is evidence, and `kmsctl audit verify --device`
    still reads it (the broker's grant covers removed devices' copies)."""
    check_device(device)
    path = devices_dir(data_dir) / f"{device}.json"
    if not path.exists():
        raise NotFound("fleet.device_unknown", f"no device {device!r} in this hub's fleet")
    removed_dir(data_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    (data_dir / "secrets" / "nats" / f"{device_user(device)}.password").unlink(missing_ok=True)
    path.replace(removed_dir(data_dir) / path.name)


def read_record(path: Path) -> DeviceRecord:
    try:
        if path.stat().st_size > MAX_RECORD_BYTES:
            raise ValueError("too large")
        raw = json.loads(path.read_text())
        device, writers = raw["device"], raw["writers"]
        # Records from before names existed have none: no certificates from the hub.
        names, profiles = raw.get("names", []), raw.get("profiles", [])
        for values in (writers, names, profiles):
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise ValueError("not a list of strings")
        if f"{device}.json" != path.name:
            raise ValueError("named for another device")
        record = DeviceRecord(check_device(device), tuple(writers), tuple(names), tuple(profiles))
        record.registry_record()
        return record
    except (OSError, ValueError, KeyError, TypeError, InvalidArgument) as exc:
        raise FailedPrecondition(
            "fleet.record_invalid",
            f"{path}: not a device record ({type(exc).__name__})",
            {"path": str(path)[:200]},
        ) from None


def list_devices(data_dir: Path, removed: bool = False) -> list[DeviceRecord]:
    """Every device of this hub's fleet, by id; `removed`: those taken out of it."""
    directory = removed_dir(data_dir) if removed else devices_dir(data_dir)
    if not directory.is_dir():
        return []
    return [read_record(p) for p in sorted(directory.glob("*.json"))]


# --- the bundle -------------------------------------------------------------------------


@dataclass(frozen=True)
class UplinkBundle:
    """What a device needs to join the hub: its id, the hub's leaf address, its hub
    user's password and the PEM CA the hub's leaf certificate must chain to."""

    device: str
    hub: str
    password: str
    hub_ca_pem: str

    @property
    def user(self) -> str:
        return device_user(self.device)

    @property
    def domain(self) -> str:
        from edgekms.fleet import device_domain

        return device_domain(self.device)

    def render(self) -> str:
        return (
            "# EdgeKMS fleet uplink bundle: secret (0600). Start the device with\n"
            "#   kmsctl up --uplink THIS_FILE\n"
            f"device = {json.dumps(self.device)}\n"
            f"hub = {json.dumps(self.hub)}\n"
            f"password = {json.dumps(self.password)}\n"
            f"hub_ca = {json.dumps(self.hub_ca_pem)}\n"
        )


def make_bundle(device: str, hub_address: str, password: str, tls: BusTLS) -> UplinkBundle:
    return UplinkBundle(device, hub_address, password, tls.ca_cert.read_text())


def write_bundle(bundle: UplinkBundle, out: Path) -> None:
    """The bundle as one 0600 file; an existing file is not overwritten."""
    if out.exists():
        raise FailedPrecondition(
            "fleet.bundle_exists", f"{out} exists: pick another path", {"path": str(out)[:200]}
        )
    write_private(out, bundle.render().encode())


def read_bundle(path: Path) -> UplinkBundle:
    """A bundle, checked whole: fleet.bundle_invalid for anything missing, malformed,
    oversized, or with a certificate that is not one."""
    try:
        if path.stat().st_size > MAX_BUNDLE_BYTES:
            raise _bundle_invalid(path, "too large for an uplink bundle")
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise _bundle_invalid(path, f"not readable as TOML ({type(exc).__name__})") from None
    values = {k: raw.get(k) for k in ("device", "hub", "password", "hub_ca")}
    missing = [k for k, v in values.items() if not isinstance(v, str) or not v]
    if missing:
        raise _bundle_invalid(path, f"needs {', '.join(missing)}")
    device, hub, password, hub_ca = (str(values[k]) for k in values)
    try:
        check_device(device)
        check_address(hub)
    except InvalidArgument as exc:
        raise _bundle_invalid(path, exc.message) from None
    try:
        x509.load_pem_x509_certificate(hub_ca.encode())
    except ValueError:
        raise _bundle_invalid(path, "hub_ca is not a PEM certificate") from None
    return UplinkBundle(device, hub, password, hub_ca)


def install_bundle(bundle_path: Path, data_dir: Path) -> UplinkBundle:
    """Check the bundle, then copy it into DATA_DIR/secrets (0600) and the hub's CA
    beside the device's nats config. A data dir that is another device's is refused
    (fleet.other_device): its audit chain is that device's."""
    bundle = read_bundle(bundle_path)
    secrets_dir = data_dir / "secrets"
    installed = secrets_dir / INSTALLED_NAME
    if installed.exists():
        old = read_bundle(installed)
        if old.device != bundle.device:
            raise FailedPrecondition(
                "fleet.other_device",
                f"{data_dir} is fleet device {old.device!r}, not {bundle.device!r}",
                {"device": old.device},
            )
    secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(installed, bundle.render().encode())
    return bundle


def hub_ca_path(data_dir: Path) -> Path:
    """Where a device keeps the CA it checks the hub's leaf certificate against."""
    return data_dir / "nats" / "hub-leaf-ca.crt"


__all__ = [
    "DEFAULT_DEVICE_PROFILES",
    "HUB_DOMAIN",
    "DeviceRecord",
    "UplinkBundle",
    "add_device",
    "check_address",
    "devices_dir",
    "hub_ca_path",
    "install_bundle",
    "leaf_tls",
    "list_devices",
    "make_bundle",
    "read_bundle",
    "remove_device",
    "removed_dir",
    "set_allowed",
    "write_bundle",
]
