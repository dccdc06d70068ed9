"""The embedded default: the whole EdgeKMS on one machine, supervised in the foreground.

`kmsctl up` starts nats-server (JetStream file store), then side by side the SoftHSM
token (created on first run; or a token that exists, `pkcs11`) and crypto service
`hsm0`, the CA service, tpm0 with --tpm, and the broker (on the first run only after
hsm0 and the bootstrap ceremony), each as its own process at `up`'s --log-level, with
its log under <data-dir>/logs. A child
that dies is restarted with backoff; one that keeps dying, or exits saying its config
or token is wrong, stops the stack with its reason. SIGINT/SIGTERM stop everything in
reverse order. <data-dir>/run/state.json says when the stack is ready and where.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient

from edgekms import audit, kvread, kvstore, natsrpc
from edgekms.crypto_client import CryptoClient
from edgekms.errors import KMSError
from edgekms.fleet import source_device
from edgekms.fleet_ca import FLEET_DEVICES_BUCKET, DeviceRegistry
from edgekms.fleet_ca import DeviceRecord as RegistryRecord
from edgekms.logs import fields
from edgekms.sealed import WRITER_BROKER, WRITER_CA, WRITER_CEREMONY
from edgekms.subjects import CA_SERVICE_NAME
from mgmt import subprocs
from mgmt.clusterinit import JoinBundle, add_brokers, open_pki, read_pki, seal_pki, write_pki
from mgmt.fleet import device_identity
from mgmt.logrotate import rotate_and_report
from mgmt.natsauth import (
    BROKER_USER,
    BUS_MAX_PAYLOAD,
    CA_USER,
    CLUSTER_PKI_SUBJECT,
    KMSCTL_USER,
    BusCredentials,
    audit_writers,
    broker_identity,
    bus_fields_toml,
    cached_password_hash,
    crypto_user,
    ensure_bus_tls,
    ensure_passwords,
    read_password,
    render_authorization,
    stack_identities,
)
from mgmt.natsserver import (
    ClusterConfig,
    HubLeafListen,
    LeafRemote,
    NatsServer,
    NatsServerConfig,
    NatsServerError,
)
from mgmt.pkcs11token import ExternalToken
from mgmt.pki import PkiPaths, run_ceremony, write_private, write_public
from mgmt.sealkeys import RESEALED_MARKER, SealKeys, ensure_seal_keys, reseal_legacy
from mgmt.softhsm import init_token
from mgmt.stacklock import metrics_addresses, metrics_parts
from mgmt.swtpm import Swtpm
from mgmt.uplink import (
    HUB_DOMAIN,
    DeviceRecord,
    UplinkBundle,
    check_address,
    devices_dir,
    hub_ca_path,
    leaf_tls,
    list_devices,
)
from mgmt.upwatch import (
    FATAL_EXIT_CODES,
    STOP_SIGNALS,
    WatchError,
    plan_restart,
)

log = logging.getLogger(__name__)

# How long a cluster node that does not listen waits for the fleet registry's stream
# info in the supervisor's loop (Stack._peer_fleet_changed).
PEER_FLEET_TIMEOUT_S = 3.0

# How long the broker may take to listen (it reads and verifies every record first).
BROKER_READY_S = 600.0
# How long a cluster node waits for its peers: for JetStream's quorum before it sets up
# the streams, and (a node other than the first) for a node to answer with the PKI.
CLUSTER_WAIT_S = 600.0
# Between readiness checks while a child starts: short, since the stack's ready time is
# the last child's ready time plus up to one interval.
PROBE_INTERVAL = 0.02


class StackError(RuntimeError):
    """The stack could not start, or a part of it failed for good."""


@dataclass(frozen=True)
class Layout:
    """Where everything lives under the data dir."""

    root: Path

    @property
    def nats_dir(self) -> Path:
        return self.root / "nats"

    @property
    def softhsm_dir(self) -> Path:
        return self.root / "softhsm"

    @property
    def secrets(self) -> Path:
        return self.root / "secrets"

    @property
    def config(self) -> Path:
        return self.root / "config"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def audit_archive(self) -> Path:
        """The broker's audit archives and checkpoints (edgekms.retention)."""
        return self.root / "audit-archive"

    @property
    def pki(self) -> PkiPaths:
        return PkiPaths(self.root / "pki")

    @property
    def client_dir(self) -> Path:
        return self.root / "client"

    @property
    def state_file(self) -> Path:
        return self.run / "state.json"


@dataclass
class StackOptions:
    data_dir: Path
    nats_port: int = 4222
    broker_listen: str = "127.0.0.1:8443"
    # The broker's enrollment listener (server-only TLS); "" : the broker's host and the
    # port after its own (8444 for 8443).
    enroll_listen: str = ""
    # PEM bundle of TPM manufacturer CAs for attested enrollment (broker ek_ca_file).
    ek_ca: Path | None = None
    # Seconds a TPM attestation or unlock challenge stays answerable (broker
    # attest_challenge_ttl).
    attest_challenge_ttl: float = 60.0
    provider_id: str = "hsm0"
    token_label: str = "edgekms"  # noqa: S105 - a label, not a secret
    # None: no TPM service; "swtpm": start swtpm for development; otherwise a TCTI
    # ("device:/dev/tpmrm0") or a device path ("/dev/tpmrm0").
    tpm: str | None = None
    tpm_provider_id: str = "tpm0"
    # The CA service's HTTP side (CRL, OCSP, CA certificates) and the base URL written
    # into certificates; "" leaves CRL DP / AIA out.
    ca_http: str = "127.0.0.1:8180"
    ca_base_url: str = ""
    # The one provider the CA service may reach on the bus ("": the first, hsm0);
    # `kmsctl ca init --provider` must name this one.
    ca_provider: str = ""
    # ACME (RFC 8555) over HTTPS from the CA service: where it listens ("" for none), the
    # names in its certificate, and a TOML file with the rest of the [acme] table
    # (http01_port, hosts, allow_dns, allow_ip, eab_required, ...: docs/ca.md, "ACME").
    acme_listen: str = ""
    acme_names: tuple[str, ...] = ()
    acme_config: Path | None = None
    # Our SPIFFE bundle endpoint over https_spiffe (ca_service.spiffe_endpoint); "" none.
    spiffe_bundle_listen: str = ""
    # How long each CRL is good for ("" : the CA's 7 days); minutes for devices whose
    # `kmsctl agent` keeps OpenVPN's crl-verify file fresh (docs/agent.md).
    ca_crl_lifetime: str = ""
    # Every child gets the level of `kmsctl up` itself (--log-level): at info the broker
    # writes a line per request, ~5 % of its CPU under load.
    log_level: str = "info"
    # Rotation of <data-dir>/logs/*.log (mgmt.logrotate): size limit and copies kept.
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 5
    # The deployment's audit stream limits: writer -> (max_bytes, max_msgs), from
    # `kmsctl up --audit-limit` (edgekms.audit.parse_limit); others keep the defaults.
    audit_limits: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Retention (broker/archiver.py): the share of each stream's limit kept, the oldest
    # age kept (seconds, 0: none), and how often the archiver looks.
    audit_window: float = 0.5
    audit_max_age: float = 7 * 24 * 3600.0
    audit_archive_interval: float = 30.0
    # JetStream's store cap (--max-file-store); None: nats-server's 75 % of free space.
    max_file_store: int | None = None
    # Seconds each service may take to become ready (--start-timeout). Imports alone
    # take seconds on a Cortex-A7 and ten times that under qemu-user (docs/arm.md).
    start_timeout: float = 30.0
    # Where the services serve /metrics, /healthz and /readyz (edgekms.metrics): the
    # broker on this address, the CA and each crypto service on the ports after it
    # (mgmt.stacklock.metrics_addresses); port 0: free ports; "": no metrics endpoints.
    metrics_listen: str = ""
    # A node of a cluster (`kmsctl up --join`, mgmt.clusterinit); None: one box.
    cluster: JoinBundle | None = None
    # `kmsctl up --embedded`: the broker and the CA service in one process (mgmt.embedded),
    # each with its own bus identity; the crypto services stay processes of their own.
    embedded: bool = False
    # A fleet hub (`kmsctl up --leaf-listen HOST:PORT`): devices' leaf connections are
    # taken there, one bus user per device recorded by `kmsctl fleet add-device`; "": none.
    leaf_listen: str = ""
    # A fleet device (`kmsctl up --uplink BUNDLE`, mgmt.uplink): its own domain and a leaf
    # connection to the hub; None: not a device.
    uplink: UplinkBundle | None = None
    # The node's own token exists already (`kmsctl up --pkcs11-module ...`, a board's
    # OP-TEE token): no SoftHSM token is made and hsm0 opens this one; None: SoftHSM.
    pkcs11: ExternalToken | None = None
    # A hub's copy of each device's audit at most this big (`--fleet-copy-limit`, a
    # board hub's small store); None: edgekms.fleet's default.
    fleet_copy_max_bytes: int | None = None

    @property
    def runs_ca(self) -> bool:
        """Whether this stack runs a CA service: not on a fleet device, whose
        certificates come from the hub's CA (its broker asks it, broker.hub_ca)."""
        return self.uplink is None

    @property
    def providers(self) -> list[str]:
        """The providers whose crypto services run here."""
        return [self.provider_id] + ([self.tpm_provider_id] if self.tpm else [])

    @property
    def all_providers(self) -> list[str]:
        """Every provider the broker reaches: on a cluster, every node's token, the first
        node's (which holds the internal CA's key) first."""
        if self.cluster is None:
            return self.providers
        return self.cluster.spec.providers

    @property
    def ca_provider_id(self) -> str:
        """The provider the CA service signs through: --ca-provider, else the first
        (on a cluster the first node's token, the same on every node)."""
        return self.ca_provider or self.all_providers[0]

    @property
    def replicas(self) -> int:
        """Copies of each bucket and audit stream: one per node (R1 on one box)."""
        return self.cluster.spec.replicas if self.cluster is not None else 1


def _route_tls(cluster: JoinBundle) -> tuple[Path | None, Path | None, Path | None]:
    """ClusterConfig's route TLS from the installed bundle: the node's route certificate,
    its key and the route CA, each peer verified (mgmt.routeca); none for a bundle made
    before route TLS, whose routes stay plain (`kmsctl up` warns)."""
    return cluster.route_tls or (None, None, None)


def _toml_value(value: object) -> str:
    """A TOML value for what an [acme] table holds: strings (JSON escapes are TOML's),
    integers, booleans and lists of those."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def acme_toml(options: StackOptions) -> str:
    """The [acme] table of ca.toml: the user's --acme-config file with --acme and
    --acme-name on top; "" without --acme. The CA checks it and refuses a bad one at
    start (kmsctl up then stops with its message)."""
    if not options.acme_listen:
        return ""
    table: dict[str, object] = {}
    if options.acme_config is not None:
        try:
            table = tomllib.loads(options.acme_config.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise StackError(f"--acme-config {options.acme_config}: {exc}") from None
    table["listen"] = options.acme_listen
    if options.acme_names:
        table["names"] = list(options.acme_names)
    elif "names" not in table:
        host = options.acme_listen.rpartition(":")[0].strip("[]")
        table["names"] = [host if host not in ("0.0.0.0", "::", "") else "127.0.0.1"]
    lines = ["[acme]"]
    subtables: list[str] = []
    for key, value in table.items():
        if isinstance(value, dict):
            subtables.append(f"[acme.{key}]")
            subtables += [f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()]
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines + subtables) + "\n"


def _secret(path: Path) -> str:
    """Read a secret file, creating it with a fresh random value on first use."""
    if not path.exists():
        write_private(path, (secrets.token_urlsafe(18) + "\n").encode())
    return path.read_text().strip()


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a supervised Python service: ours, plus `extra`, plus malloc tuning.

    glibc gives threads their own malloc arenas (up to 8 per core) and each keeps what was
    freed in it; the services run thread pools (token calls, grpc's C core), so idle
    arenas hold megabytes. Two arenas cost no measurable CPU at our request rates. An
    operator's own MALLOC_ARENA_MAX wins.
    """
    return {"MALLOC_ARENA_MAX": "2", **os.environ, **(extra or {})}


@dataclass
class Child:
    """One supervised process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    ready: Callable[[], Coroutine[Any, Any, None]]
    process: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)

    def spawn(self) -> None:
        self.process = subprocs.spawn(self.argv, self.log_path, self.env)

    def stop(self, timeout: float = 10.0) -> None:
        subprocs.end(self.process, timeout)

    def last_log_line(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""


class Stack:
    def __init__(self, options: StackOptions):
        self.options = options
        self.layout = Layout(options.data_dir)
        self.nats: NatsServer | None = None
        # The supervisor's bus identity holds the ceremony grant (mgmt.natsauth) only
        # until the ceremony is done; then the server is reloaded without it.
        self._ceremony_grant = False
        self.swtpm: Swtpm | None = None
        self.children: list[Child] = []
        # Spawned, not yet ready (recorded in the state file all the same).
        self._starting: list[Child] = []
        self._stopping = asyncio.Event()
        # Each part's bus identity (mgmt.natsauth), filled in when nats-server starts.
        self.bus: dict[str, BusCredentials] = {}
        # Each writer's record-sealing key (mgmt.sealkeys), made with the directories.
        self.seal_keys: SealKeys | None = None
        # One connection for every readiness probe: each connect costs a TLS handshake
        # and a password check in nats-server, and probes run while services start.
        self._probe: NatsClient | None = None
        self._probe_lock = asyncio.Lock()
        # A cluster node's connection answering for the cluster's PKI (mgmt.clusterinit).
        self._pki_server: NatsClient | None = None
        # A fleet hub's device records as last rendered, and as last fully applied
        # (users reloaded and copies made): supervise() retries until the two agree.
        self._fleet_seen: list[DeviceRecord] = []
        self._fleet_applied: list[DeviceRecord] | None = None
        self._fleet_mtime = -1
        # On a cluster node that does not listen: the devices the hub's registry holds
        # (replicated, R3), so its broker reads their copies too, and the registry
        # stream's last sequence when they were read (_peer_fleet_changed).
        self._peer_fleet: list[str] = []
        self._peer_fleet_seq = -1
        # Each part's metrics address (part -> (host, port)); empty: no endpoints.
        self.metrics = metrics_addresses(options.metrics_listen, metrics_parts(options.providers))

    def _metrics_toml(self, part: str) -> str:
        """The `metrics_listen` line of a part's config (edgekms.metrics), or nothing."""
        if part not in self.metrics:
            return ""
        host, port = self.metrics[part]
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return f"metrics_listen = {json.dumps(where)}\n"

    def metrics_urls(self) -> dict[str, str]:
        """part -> its /metrics URL, for state.json, `kmsctl status` and Prometheus."""
        return {
            part: (f"http://[{h}]:{p}/metrics" if ":" in h else f"http://{h}:{p}/metrics")
            for part, (h, p) in self.metrics.items()
        }

    @property
    def nats_url(self) -> str:
        return f"tls://127.0.0.1:{self.options.nats_port}"

    def _prepare_dirs(self) -> None:
        # The audit archive too, before its first round: `kmsctl audit verify --archive`
        # on a stack that has archived nothing yet proves the window from entry 1.
        for path in (
            self.layout.root,
            self.layout.secrets,
            self.layout.run,
            self.layout.audit_archive,
        ):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        for path in (self.layout.config, self.layout.logs, self.layout.nats_dir):
            path.mkdir(parents=True, exist_ok=True)
        # Record sealing (edgekms.sealed): each writer's key named only by its config.
        self.seal_keys = ensure_seal_keys(self.layout.secrets)

    @property
    def _seals(self) -> SealKeys:
        assert self.seal_keys is not None, "directories not prepared"
        return self.seal_keys

    def _nats_config(self, ceremony: bool, setup: bool = False) -> NatsServerConfig:
        # One identity per part, least privilege each; TLS from the bus CA (mgmt.natsauth).
        # The supervisor may touch the internal CA's key only while the ceremony is due,
        # and make or harden streams only while it sets the stack up.
        cluster = self.options.cluster
        fleet = self._fleet_devices()
        identities = stack_identities(
            self.options.all_providers,
            self.options.ca_provider_id,
            ceremony=ceremony,
            setup=setup,
            local=self.options.providers if cluster is not None else None,
            fleet_devices=sorted(
                {r.device for r in [*fleet, *self._fleet_removed()]} | set(self._peer_fleet)
            ),
            hub_ca_device=self.options.uplink.device if self.options.uplink else "",
        )
        identities += [device_identity(r.device) for r in fleet]
        tls = ensure_bus_tls(self.layout.nats_dir / "tls", self.layout.secrets)
        passwords = ensure_passwords(self.layout.secrets, [i.user for i in identities])
        self.bus = {user: BusCredentials(user, p, tls.ca_cert) for user, p in passwords.items()}
        return NatsServerConfig(
            store_dir=self.layout.nats_dir / "jetstream",
            port=self.options.nats_port,
            max_payload=BUS_MAX_PAYLOAD,
            max_file_store=self.options.max_file_store,
            tls_cert=tls.server_cert,
            tls_key=tls.server_key,
            authorization=render_authorization(
                identities,
                {user: read_password(p) for user, p in passwords.items()},
                {user: cached_password_hash(p) for user, p in passwords.items()},
            ),
            **(self._cluster_fields(cluster) if cluster is not None else {}),
            **self._fleet_fields(),
        )

    # --- fleet (docs/cluster.md, "Fleet"): a hub's leaf listener, a device's uplink ---------

    def _fleet_devices(self) -> list[DeviceRecord]:
        """On a hub, the devices `kmsctl fleet add-device` recorded, as rendered last
        (supervise() notices a change and reloads); elsewhere none."""
        if not self.options.leaf_listen:
            return []
        self._fleet_seen = list_devices(self.layout.root)
        return self._fleet_seen

    def _fleet_removed(self) -> list[DeviceRecord]:
        """On a hub, devices taken out of the fleet: the broker still reads their copies."""
        if not self.options.leaf_listen:
            return []
        return list_devices(self.layout.root, removed=True)

    def _fleet_fields(self) -> dict[str, Any]:
        """nats-server's fleet settings: on a hub, the domain "hub" and the leaf listener
        (TLS with the hub's leaf certificate, mgmt.uplink.leaf_tls); on any other cluster
        node the domain "hub" alone; on a device, its domain and its leaf remote (the
        password from its installed bundle goes into the 0600 config only); elsewhere
        nothing."""
        uplink = self.options.uplink
        if self.options.cluster is not None and not self.options.leaf_listen:
            # A hub that is a cluster: its nodes must share one JetStream domain, so every
            # node is in "hub", listening or not (an existing store takes it whole:
            # tests/cluster/test_hub_domain.py).
            return {"domain": HUB_DOMAIN}
        if self.options.leaf_listen:
            host, port = check_address(self.options.leaf_listen, "--leaf-listen")
            named = () if host in ("0.0.0.0", "::") else (host,)
            tls = leaf_tls(self.layout.root, named)
            return {
                "domain": HUB_DOMAIN,
                "leaf_listen": HubLeafListen(
                    port=port, host=host, tls_cert=tls.server_cert, tls_key=tls.server_key
                ),
            }
        if uplink is not None:
            ca = hub_ca_path(self.layout.root)
            if not ca.exists() or ca.read_text() != uplink.hub_ca_pem:
                write_public(ca, uplink.hub_ca_pem.encode())
            return {
                "domain": uplink.domain,
                "server_name": uplink.domain,
                "leaf_remote": LeafRemote(
                    url=uplink.hub, user=uplink.user, password=uplink.password, tls_ca=ca
                ),
            }
        return {}

    async def _source_fleet(self) -> None:
        """Under the supervisor's setup grant, for each device recorded or changed since
        the last pass: the hub's copy of its audit (edgekms.fleet.source_device) and its
        entry in the device registry the hub's CA reads (edgekms.fleet_ca); a removed
        device's entry is kept, disabled: the CA refuses it, the broker still knows it."""
        records = list(self._fleet_seen)
        removed = self._fleet_removed()
        if not records and not removed:
            self._fleet_applied = records
            return
        # The first pass after a start checks every device; later ones what changed.
        before = {r.device: r for r in self._fleet_applied or []}
        first = self._fleet_applied is None
        nc = await natsrpc.connect(
            self.nats_url, name="kmsctl-fleet", connect_timeout=5, **self._kmsctl_bus()
        )
        try:
            js = nc.jetstream(timeout=10)
            registry = await DeviceRegistry.open(js, self.options.replicas)
            for record in records:
                if not first and before.get(record.device) == record:
                    continue
                # One copy per node on a cluster hub: the copy outlives the node the
                # device's leaf connection reaches.
                await source_device(
                    js,
                    record.device,
                    record.writers,
                    replicas=self.options.replicas,
                    **self._copy_limit(),
                )
                if await self._registry_get(registry, record.device) != (
                    want := record.registry_record()
                ):
                    await registry.put(want)
            for gone in removed:
                # Kept, disabled: the CA refuses it and the broker still knows the
                # device whose audit copy it keeps.
                if first or gone.device in before:
                    disabled = replace(gone.registry_record(), enabled=False)
                    if await self._registry_get(registry, gone.device) != disabled:
                        await registry.put(disabled)
        finally:
            await nc.close()
        self._fleet_applied = records

    @staticmethod
    async def _registry_get(registry: DeviceRegistry, device: str) -> RegistryRecord | None:
        """The registry's entry, or None where it is missing or unreadable (then the
        supervisor writes it again from the hub's record)."""
        try:
            return await registry.get(device)
        except KMSError:
            return None

    async def _refresh_fleet(self) -> None:
        """A device added or removed while the hub runs: reload nats-server (SIGHUP) with
        the new users and the setup grant, make the new copies, then reload without the
        grant, whatever happened (the grant never outlives the setup)."""
        assert self.nats is not None
        before = {r.device for r in self._fleet_seen}
        try:
            config = self._nats_config(ceremony=self._ceremony_grant, setup=True)
            await asyncio.to_thread(self.nats.reload, config)
            await self._source_fleet()
        finally:
            config = self._nats_config(ceremony=self._ceremony_grant)
            await asyncio.to_thread(self.nats.reload, config)
        now = {r.device for r in self._fleet_seen}
        log.info(
            "fleet changed",
            extra=fields(
                added=",".join(sorted(now - before)), removed=",".join(sorted(before - now))
            ),
        )

    def _fleet_changed(self) -> bool:
        """The hub's device records differ from those last applied. The directory's
        mtime (a record added or removed) is looked at first, so a hub with thousands of
        devices does not read every record every two seconds."""
        if not self.options.leaf_listen:
            return False
        try:
            mtime = devices_dir(self.layout.root).stat().st_mtime_ns
        except OSError:
            mtime = 0
        if mtime == self._fleet_mtime and self._fleet_applied is not None:
            return False
        try:
            changed = list_devices(self.layout.root) != self._fleet_applied
            if not changed:
                self._fleet_mtime = mtime
            return changed
        except KMSError as exc:
            log.warning("fleet record unreadable", extra=fields(reason=exc.reason))
            return False

    async def _peer_fleet_changed(self) -> bool:
        """On a cluster node that does not listen: whether the hub's device registry
        (written by the listening node's supervisor, replicated to every node) names
        other devices than this node's broker is granted; if so they are taken. The
        registry stream's last sequence is looked at first, so thousands of devices
        are not listed every two seconds."""
        if self.options.cluster is None or self.options.leaf_listen:
            return False
        nc = await self._probe_connection()
        # Short: this runs in the supervisor's loop, which must not stall for long while
        # the cluster has no quorum (the next look, two seconds on, tries again).
        js = nc.jetstream(timeout=PEER_FLEET_TIMEOUT_S)
        try:
            info = await js.stream_info(f"KV_{FLEET_DEVICES_BUCKET}")
        except nats.js.errors.NotFoundError:
            return False
        last = info.state.last_seq
        if last == self._peer_fleet_seq:
            return False
        # Not KeyValue.keys(): it rides nats-py's watcher, whose end marker can come
        # before the last key (edgekms.kvread), and a device left out would stay
        # ungranted until the registry changed again.
        entries, _ = await kvread.snapshot(js, FLEET_DEVICES_BUCKET)
        devices = sorted({e.key for e in entries if not kvread.is_removal(e)})
        self._peer_fleet_seq = last
        if devices == self._peer_fleet:
            return False
        self._peer_fleet = devices
        return True

    async def _refresh_peer_fleet(self) -> None:
        """The broker of a node that does not listen granted every registered device's
        copy (nats-server reloaded, SIGHUP), so `kmsctl audit verify --device` works
        through any node's broker."""
        if not await self._peer_fleet_changed():
            return
        assert self.nats is not None
        config = self._nats_config(ceremony=self._ceremony_grant)
        await asyncio.to_thread(self.nats.reload, config)
        log.info("fleet grant changed", extra=fields(devices=len(self._peer_fleet)))

    def _fleet_state(self) -> dict[str, Any]:
        """state.json's fleet entry: the hub's listener and devices, or the device's id
        and hub; nothing on a stack outside a fleet."""
        if self.options.leaf_listen:
            devices = sorted(r.device for r in self._fleet_seen)
            return {
                "fleet": {
                    "role": "hub",
                    "leaf_listen": self.options.leaf_listen,
                    "devices": devices,
                }
            }
        if self.options.uplink is not None:
            uplink = self.options.uplink
            return {"fleet": {"role": "device", "device": uplink.device, "hub": uplink.hub}}
        return {}

    @staticmethod
    def _cluster_fields(cluster: JoinBundle) -> dict[str, Any]:
        """This node's server name and cluster block: routes to every other node, the
        route password from the bundle (in the 0600 config, never on a command line),
        and TLS on the routes with the bundle's route certificate (`_route_tls`)."""
        node = cluster.node
        return {
            "server_name": node.name,
            "cluster": ClusterConfig(
                name=cluster.spec.name,
                port=node.route_port,
                host=node.host,
                routes=tuple(n.route for n in cluster.spec.nodes if n.name != node.name),
                password=cluster.route_password(),
                tls_cert=_route_tls(cluster)[0],
                tls_key=_route_tls(cluster)[1],
                tls_ca=_route_tls(cluster)[2],
            ),
        }

    def _start_nats(self) -> None:
        # On a cluster only the first node runs the ceremony; the others fetch its PKI.
        cluster = self.options.cluster
        first = cluster is None or cluster.is_first
        self._ceremony_grant = first and not self._ceremony_done()
        config = self._nats_config(ceremony=self._ceremony_grant, setup=True)
        self.nats = NatsServer(
            config, self.layout.nats_dir / "nats.conf", self.layout.logs / "nats.log"
        )
        self.nats.start()

    async def _set_up_state(self) -> None:
        """Make every bucket and the audit stream, or harden those an older version
        made (edgekms.kvstore, edgekms.audit), before any service starts; then reload
        the bus without the supervisor's setup grant. On a cluster node, with one copy
        per node, once JetStream has its quorum (retried until CLUSTER_WAIT_S)."""
        try:
            if self.options.cluster is None:
                await self._harden_streams(None)
            else:
                await self._harden_streams_on_cluster()
            await self._source_fleet()
            # Records of a stack from before sealing: sealed once by their owners' keys,
            # before any service reads them (mgmt.sealkeys.reseal_legacy).
            await reseal_legacy(
                self.nats_url,
                {user: self.bus[user].connect_options() for user in (BROKER_USER, CA_USER)},
                self._seals,
                self.layout.secrets / "seal" / RESEALED_MARKER,
            )
        finally:
            # Withdrawn whatever happened: the grant never outlives the setup.
            assert self.nats is not None
            config = self._nats_config(ceremony=self._ceremony_grant)
            await asyncio.to_thread(self.nats.reload, config)

    async def _harden_streams(self, replicas: int | None) -> None:
        nc = await natsrpc.connect(
            self.nats_url, name="kmsctl-setup", connect_timeout=5, **self._kmsctl_bus()
        )
        try:
            js = nc.jetstream(timeout=10)
            for spec in kvstore.BUCKETS.values():
                await kvstore.harden(js, spec, replicas=replicas)
            await audit.harden_stream(
                js,
                audit_writers(self.options.all_providers),
                self.options.audit_limits,
                replicas=replicas,
            )
        finally:
            await nc.close()

    async def _harden_streams_on_cluster(self) -> None:
        """Every node hardens every stream to the cluster's copies: the first to get
        there creates it, the others find it so. Until the other nodes' servers are up
        JetStream has no quorum (and an R3 stream no three peers): waited for."""
        deadline = time.monotonic() + max(CLUSTER_WAIT_S, self.options.start_timeout)
        attempt = 0
        while True:
            try:
                await self._harden_streams(self.options.replicas)
                return
            except (KMSError, nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                attempt += 1
                if time.monotonic() > deadline:
                    raise StackError(
                        f"the cluster's JetStream did not take the streams in "
                        f"{CLUSTER_WAIT_S:g}s ({type(exc).__name__}: {str(exc)[:200]}): are "
                        "the other nodes up, and their routes reachable?"
                    ) from None
                if attempt % 20 == 1:
                    log.info(
                        "waiting for the cluster's JetStream",
                        extra=fields(error=type(exc).__name__, attempt=attempt),
                    )
                await asyncio.sleep(0.5)

    def _end_ceremony_grant(self) -> None:
        """Reload the bus without the supervisor's grant on the internal CA's key: from
        here on only the broker (issuing client certificates) may sign with it."""
        if not self._ceremony_grant or self.nats is None:
            return
        self.nats.reload(self._nats_config(ceremony=False))
        self._ceremony_grant = False
        log.info("ceremony grant withdrawn", extra=fields(part="nats"))

    def _bus_toml(self, user: str) -> str:
        creds = self.bus[user]
        assert creds.password_file is not None and creds.ca_file is not None
        return bus_fields_toml(user, creds.password_file, creds.ca_file)

    def _kmsctl_bus(self) -> dict[str, Any]:
        """`kmsctl up`'s own bus options (readiness probes, the ceremony)."""
        return self.bus[KMSCTL_USER].connect_options()

    async def _probe_connection(self) -> NatsClient:
        async with self._probe_lock:
            if self._probe is None or self._probe.is_closed:
                self._probe = await natsrpc.connect(
                    self.nats_url, name="kmsctl-up", connect_timeout=2, **self._kmsctl_bus()
                )
            return self._probe

    async def _close_probe(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None and not probe.is_closed:
            with contextlib.suppress(Exception):
                await probe.close()

    def _softhsm_env(self) -> dict[str, str]:
        label = self.options.token_label
        pin = _secret(self.layout.secrets / f"{self.options.provider_id}.pin")
        so_pin = _secret(self.layout.secrets / f"{self.options.provider_id}.so-pin")
        token = init_token(self.layout.softhsm_dir, label, pin=pin, so_pin=so_pin)
        return child_env(token.env())

    def _pkcs11_section(self) -> str:
        from mgmt.softhsm import find_module

        pin_file = self.layout.secrets / f"{self.options.provider_id}.pin"
        return (
            "[pkcs11]\n"
            f"module = {json.dumps(find_module())}\n"
            f"token_label = {json.dumps(self.options.token_label)}\n"
            f"pin_file = {json.dumps(str(pin_file))}\n"
            "sessions = 4\n"
        )

    def _tpm2_section(self, tcti: str) -> str:
        provider = self.options.tpm_provider_id
        auth = self.layout.secrets / f"{provider}.auth"
        _secret(auth)
        section = (
            "[tpm2]\n"
            f"tcti = {json.dumps(tcti)}\n"
            f"state_dir = {json.dumps(str(self.layout.root / provider))}\n"
            f"key_auth_file = {json.dumps(str(auth))}\n"
        )
        from mgmt.tpm_provision import auth_file

        owner = auth_file(self.layout.secrets, "owner")
        endorsement = auth_file(self.layout.secrets, "endorsement")
        if owner.exists():
            section += f"owner_auth_file = {json.dumps(str(owner))}\n"
        else:
            log.warning(
                "the TPM has no owner auth from `kmsctl tpm provision`: anyone who can reach"
                " it may clear its lockout or the TPM itself",
                extra=fields(tcti=tcti),
            )
        if endorsement.exists():
            section += f"endorsement_auth_file = {json.dumps(str(endorsement))}\n"
        return section

    def _start_swtpm(self) -> str:
        """swtpm on private Unix sockets, its platform hierarchy locked as firmware would,
        and provisioned (hierarchy auth in the secrets dir) before tpm0 connects."""
        from mgmt.swtpm import Swtpm
        from mgmt.tpm_provision import provision

        self.swtpm = Swtpm.private(self.layout.root / "swtpm", lock_platform=True)
        self.swtpm.log_path = self.layout.logs / "swtpm.log"
        self.swtpm.start()
        result = provision(self.swtpm.tcti, self.layout.secrets)
        log.info("swtpm provisioned", extra=fields(**result.auth))
        return self.swtpm.tcti

    def _tpm_tcti(self) -> str:
        tpm = self.options.tpm or ""
        if tpm == "swtpm":
            return self._start_swtpm()
        if tpm.startswith("/dev/"):
            return f"device:{tpm}"
        return tpm

    def _crypto_child(self, provider: str, section: str, env: dict[str, str]) -> Child:
        conf = self.layout.config / f"crypto-{provider}.toml"
        header = f"provider_id = {json.dumps(provider)}\nnats_url = {json.dumps(self.nats_url)}\n"
        header += self._bus_toml(crypto_user(provider))
        header += self._metrics_toml(f"crypto-{provider}")
        header += self._replicas_toml()
        write_public(conf, (header + section).encode())

        async def ready() -> None:
            client = CryptoClient(await self._probe_connection())
            deadline = time.monotonic() + self.options.start_timeout
            while True:
                try:
                    await client.ping(provider, timeout=0.5)
                    return
                except KMSError:
                    if time.monotonic() > deadline:
                        raise
                    # "No responders" comes back at once until the service subscribes.
                    await asyncio.sleep(PROBE_INTERVAL)

        return Child(
            name=f"crypto-{provider}",
            argv=[_script("kms-crypto"), "--config", str(conf), *self._log_args()],
            env=env,
            log_path=self.layout.logs / f"crypto-{provider}.log",
            ready=ready,
        )

    def _ca_child(self) -> Child:
        conf = self.layout.config / "ca.toml"
        write_public(
            conf,
            (
                f"nats_url = {json.dumps(self.nats_url)}\n"
                f"{self._bus_toml(CA_USER)}"
                f"{self._seals.toml(WRITER_CA)}"
                f"http_listen = {json.dumps(self.options.ca_http)}\n"
                f"base_url = {json.dumps(self.options.ca_base_url)}\n"
                f"{self._metrics_toml('ca')}"
                f"{self._replicas_toml()}"
                + (
                    f"crl_lifetime = {json.dumps(self.options.ca_crl_lifetime)}\n"
                    if self.options.ca_crl_lifetime
                    else ""
                )
                + (
                    f"spiffe_bundle_listen = {json.dumps(self.options.spiffe_bundle_listen)}\n"
                    if self.options.spiffe_bundle_listen
                    else ""
                )
                # A hub's CA also answers its fleet devices (ca_service.fleet); on a
                # cluster every node's does, since a device's request crosses the routes
                # to whichever CA takes it.
                + ("fleet = true\n" if self._ca_fleet else "")
                # Tables last: a key after `[acme]` would be read as the table's.
                + acme_toml(self.options)
            ).encode(),
        )
        host, _, port = self.options.ca_http.rpartition(":")

        async def ready() -> None:
            # The CA serves HTTP only after its NATS endpoints: the port first, then a ping.
            # No short limit: with 50,000 sealed records the broker verifies for tens of
            # seconds on a loaded board; it ends itself if its snapshot stalls
            # (broker.buckets.SNAPSHOT_STALL_S), and an exit is seen at once.
            await _wait_port(host, int(port), max(BROKER_READY_S, self.options.start_timeout))
            nc = await self._probe_connection()
            # Pinged until it answers, within the service's start timeout: on a loaded
            # machine the CA's first answer can take longer than one 5 s request (a
            # single ping used to fail the whole `kmsctl up`). An exit is still seen at
            # once by the supervisor.
            deadline = time.monotonic() + self.options.start_timeout
            while True:
                try:
                    await nc.request(f"$SRV.PING.{CA_SERVICE_NAME}", b"", timeout=5)
                    return
                except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)

        return Child(
            name="ca",
            argv=[_script("kmsctl"), "ca", "serve", "--config", str(conf), *self._log_args()],
            env=child_env(),
            log_path=self.layout.logs / "ca.log",
            ready=ready,
        )

    @property
    def enroll_listen(self) -> str:
        if self.options.enroll_listen:
            return self.options.enroll_listen
        host, _, port = self.options.broker_listen.rpartition(":")
        return f"{host}:{int(port) + 1}"

    def _broker_child(self) -> Child:
        pki = self.layout.pki
        conf = self.layout.config / "broker.toml"
        write_public(
            conf,
            (
                f"listen = {json.dumps(self.options.broker_listen)}\n"
                f"nats_url = {json.dumps(self.nats_url)}\n"
                f"{self._bus_toml(broker_identity().user)}"
                f"{self._seals.toml(WRITER_BROKER)}"
                f"default_provider = {json.dumps(self.options.provider_id)}\n"
                f"providers = {json.dumps(self.options.all_providers)}\n"
                f"{self._provider_nodes_toml()}"
                f"{self._replicas_toml()}"
                f"{self._hub_ca_toml()}"
                f"enroll_listen = {json.dumps(self.enroll_listen)}\n"
                f"audit_archive_dir = {json.dumps(str(self.layout.audit_archive))}\n"
                f"audit_window = {self.options.audit_window!r}\n"
                f"audit_max_age = {self.options.audit_max_age!r}\n"
                f"audit_archive_interval = {self.options.audit_archive_interval!r}\n"
                f"{self._metrics_toml('broker')}"
                f"attest_challenge_ttl = {self.options.attest_challenge_ttl!r}\n"
                + (
                    f"ek_ca_file = {json.dumps(str(self.options.ek_ca))}\n"
                    if self.options.ek_ca
                    else ""
                )
                + "[tls]\n"
                f"cert = {json.dumps(str(pki.broker_cert))}\n"
                f"key = {json.dumps(str(pki.broker_key))}\n"
                f"client_ca = {json.dumps(str(pki.ca_cert))}\n"
            ).encode(),
        )
        host, _, port = self.options.broker_listen.rpartition(":")

        async def ready() -> None:
            # The broker listens only once its bus, registry, audit stream and buckets
            # are open and health says SERVING (broker.server.Broker.start).
            # No short limit: with 50,000 sealed records the broker verifies for tens of
            # seconds on a loaded board; it ends itself if its snapshot stalls
            # (broker.buckets.SNAPSHOT_STALL_S), and an exit is seen at once.
            await _wait_port(host, int(port), max(BROKER_READY_S, self.options.start_timeout))

        return Child(
            name="broker",
            argv=[_script("kms-broker"), "--config", str(conf), *self._log_args()],
            env=child_env(),
            log_path=self.layout.logs / "broker.log",
            ready=ready,
        )

    @property
    def _ca_fleet(self) -> bool:
        """Whether the CA answers fleet devices: on a hub, and on every cluster node (a
        device's request may reach any node's CA; until the registry exists every
        device is unknown to it)."""
        return bool(self.options.leaf_listen) or self.options.cluster is not None

    def _hub_ca_toml(self) -> str:
        """broker.toml's CA: this stack's own, or on a fleet device the hub's, reached
        across the leaf connection as this device (broker.hub_ca)."""
        if self.options.uplink is not None:
            return f"ca = false\nhub_ca_device = {json.dumps(self.options.uplink.device)}\n"
        return "ca = true\n"

    def _replicas_toml(self) -> str:
        """A service's `replicas` line on a cluster (what it creates gets one copy per
        node, as the supervisor made the rest); nothing on one box."""
        return f"replicas = {self.options.replicas}\n" if self.options.cluster else ""

    def _provider_nodes_toml(self) -> str:
        """broker.toml's provider -> node table on a cluster (its UNAVAILABLE names the
        node of a provider nothing answers for); nothing on one box."""
        cluster = self.options.cluster
        if cluster is None:
            return ""
        pairs = ", ".join(
            f"{json.dumps(n.provider)} = {json.dumps(n.name)}" for n in cluster.spec.nodes
        )
        return f"provider_nodes = {{ {pairs} }}\n"

    def _embedded_child(self) -> Child:
        """The broker and the CA service in one process (mgmt.embedded), each from its own
        config file with its own bus identity, exactly as the two processes get them;
        ready when both are (the CA's HTTP port and ping, the broker's port)."""
        ca, broker = self._ca_child(), self._broker_child()

        async def ready() -> None:
            await asyncio.gather(ca.ready(), broker.ready())

        return Child(
            name="broker",
            argv=[
                sys.executable,
                "-m",
                "mgmt.embedded",
                "--broker-config",
                str(self.layout.config / "broker.toml"),
                "--ca-config",
                str(self.layout.config / "ca.toml"),
                *self._log_args(),
            ],
            env=child_env(),
            log_path=self.layout.logs / "broker.log",
            ready=ready,
        )

    def _log_args(self) -> list[str]:
        return ["--log-level", self.options.log_level]

    async def _start_child(self, child: Child) -> None:
        child.spawn()
        # Recorded at once, so that a supervisor killed while starting leaves the pids
        # the next `kmsctl up` needs to end its leftovers (mgmt.stacklock).
        self._starting.append(child)
        self._write_state(False)
        log.debug(
            "spawned",
            extra=fields(part=child.name, pid=child.process.pid if child.process else None),
        )
        ready = asyncio.create_task(child.ready())
        try:
            while not ready.done():
                await asyncio.wait({ready}, timeout=0.05)
                assert child.process is not None
                code = child.process.poll()
                if code is not None:
                    reason = FATAL_EXIT_CODES.get(code, f"exit code {code}")
                    raise StackError(
                        f"{child.name} failed to start ({reason}): {child.last_log_line()}"
                    )
            ready.result()
        except BaseException:
            # Children start side by side: one failing cancels the others, and a child
            # that never became ready is not in self.children, so stop() would miss it.
            ready.cancel()
            child.stop(timeout=5.0)
            raise
        finally:
            self._starting.remove(child)
        self.children.append(child)
        log.info(
            "started",
            extra=fields(part=child.name, pid=child.process.pid if child.process else None),
        )

    def _write_state(self, ready: bool) -> None:
        write_public(self.layout.state_file, json.dumps(self._state(ready), indent=2).encode())

    def _state(self, ready: bool) -> dict[str, Any]:
        """What run/state.json says (mgmt.stackstate reads it; so does `kmsctl status`)."""
        return {
            "ready": ready,
            "nats_url": self.nats_url,
            "broker": self.options.broker_listen,
            "enroll": self.enroll_listen,
            # A fleet device serves neither: its CA is the hub's.
            "ca_http": self.options.ca_http if self.options.runs_ca else "",
            "acme_listen": self.options.acme_listen if self.options.runs_ca else "",
            # Each part's /metrics URL (/healthz and /readyz beside it); {} when off.
            "metrics": self.metrics_urls(),
            "client_config": str(self.layout.client_dir / "config.toml"),
            "pid": os.getpid(),
            "children": {
                c.name: c.process.pid
                for c in [*self.children, *self._starting]
                if c.process is not None
            },
            # Current pids, rewritten after every restart (fault drills kill them by pid).
            "nats_pid": (
                self.nats.process.pid if self.nats is not None and self.nats.process else None
            ),
            # For a takeover after this supervisor is killed (mgmt.stacklock.reap_orphans).
            "swtpm_pid": (
                self.swtpm.process.pid if self.swtpm is not None and self.swtpm.process else None
            ),
            "data_dir": str(self.layout.root.resolve()),
            **(
                {"cluster": self.options.cluster.spec.name, "node": self.options.cluster.node.name}
                if self.options.cluster is not None
                else {}
            ),
            # Services hosted inside another child's process (kmsctl up --embedded).
            "embedded": {"broker": ["ca"]} if self.options.embedded else {},
            **self._fleet_state(),
        }

    async def start(self) -> None:
        self._prepare_dirs()
        with contextlib.suppress(FileNotFoundError):
            self.layout.state_file.unlink()
        self._start_nats()
        self._write_state(False)
        log.info("started", extra=fields(part="nats", url=self.nats_url))
        await self._set_up_state()
        # Once NATS is up the parts need only it, except the ceremony (needs hsm0) and
        # the broker (needs the ceremony's files): start the rest side by side, so the
        # start costs the slowest chain, not the sum of every service's imports. On a data
        # dir the ceremony has done, the broker needs nothing from hsm0 to start, so it
        # starts beside it; ready still waits for every child, hsm0 included.
        initialised = self._ceremony_done()
        chains = [self._start_hsm_ceremony_broker(with_broker=not initialised)]
        if self.options.runs_ca and not self.options.embedded:
            # Embedded, the CA service starts with the broker, in its process.
            chains.append(self._start_child(self._ca_child()))
        if initialised:
            chains.append(self._start_ceremony_broker())
        if self.options.tpm:
            chains.append(self._start_tpm())
        try:
            await _together(chains)
        finally:
            await self._close_probe()
        order = {name: i for i, name in enumerate(self._child_order())}
        self.children.sort(key=lambda c: order.get(c.name, len(order)))
        self._write_state(True)

    def _child_order(self) -> list[str]:
        """Start order as before the parallel start: stop() stops them in reverse."""
        services = (
            ["ca", "broker"] if self.options.runs_ca and not self.options.embedded else ["broker"]
        )
        return [f"crypto-{p}" for p in self.options.providers] + services

    async def _start_tpm(self) -> None:
        tcti = await asyncio.to_thread(self._tpm_tcti)
        section = self._tpm2_section(tcti)
        child = self._crypto_child(self.options.tpm_provider_id, section, child_env())
        await self._start_child(child)

    def _ceremony_done(self) -> bool:
        """The files the ceremony makes are all there (mgmt.pki.run_ceremony then only
        points the client config at this broker, without the bus)."""
        pki = self.layout.pki
        cluster = self.options.cluster
        if cluster is not None and not cluster.is_first:
            # A node other than the first has the cluster's PKI and no admin of its own.
            return all(p.exists() for p in (pki.ca_cert, pki.broker_cert, pki.broker_key))
        client_config = self.layout.client_dir / "config.toml"
        return all(p.exists() for p in (pki.ca_cert, pki.broker_cert, client_config))

    def _copy_limit(self) -> dict[str, int]:
        """source_device's max_bytes from --fleet-copy-limit; {}: its default."""
        limit = self.options.fleet_copy_max_bytes
        return {} if limit is None else {"max_bytes": limit}

    def _token_env_and_section(self) -> tuple[dict[str, str], str]:
        """The token crypto service's environment and [pkcs11] section: SoftHSM's
        (made on first run), or the existing token --pkcs11-module names."""
        token = self.options.pkcs11
        if token is None:
            return self._softhsm_env(), self._pkcs11_section()
        return child_env(), self._external_pkcs11_section(token)

    @staticmethod
    def _external_pkcs11_section(token: ExternalToken) -> str:
        """[pkcs11] for a token the stack did not make: its module, label and PIN file
        as given (the PIN stays in its file; kms-crypto reads it)."""
        return (
            "[pkcs11]\n"
            f"module = {json.dumps(str(token.module))}\n"
            f"token_label = {json.dumps(token.label)}\n"
            f"pin_file = {json.dumps(str(token.pin_file))}\n"
            # As the board's crypto-hsm0.toml: OP-TEE's TA holds few sessions at once.
            "sessions = 2\n"
        )

    async def _start_hsm_ceremony_broker(self, with_broker: bool = True) -> None:
        env, section = await asyncio.to_thread(self._token_env_and_section)
        await self._start_child(self._crypto_child(self.options.provider_id, section, env))
        if with_broker:
            await self._start_ceremony_broker()

    async def _start_ceremony_broker(self) -> None:
        cluster = self.options.cluster
        if cluster is not None and not cluster.is_first:
            await self._fetch_cluster_pki(cluster)
        else:
            await self._ceremony()
        if cluster is not None:
            await self._serve_cluster_pki(cluster)
        await asyncio.to_thread(self._end_ceremony_grant)
        if self.options.embedded:
            await self._start_child(self._embedded_child())
        else:
            await self._start_child(self._broker_child())

    async def _ceremony(self) -> None:
        """The bootstrap ceremony (once; on a cluster on the first node only): the broker
        certificate names every node, the admin's client config lists every broker."""
        host = self.options.broker_listen.rpartition(":")[0]
        cluster = self.options.cluster
        names = {"localhost", "127.0.0.1", host}
        broker_address = self.options.broker_listen.replace("0.0.0.0", "127.0.0.1")
        if cluster is not None:
            names |= {n.host for n in cluster.spec.nodes}
            broker_address = cluster.node.broker
        result = await run_ceremony(
            self.nats_url,
            self.options.provider_id,
            self.layout.pki.root,
            self.layout.client_dir,
            broker_address=broker_address,
            broker_names=sorted(names - {"0.0.0.0", ""}),
            nats_options=self._kmsctl_bus(),
            seal=self._seals.seal(WRITER_CEREMONY),
        )
        if result.created:
            log.info("bootstrap ceremony done", extra=fields(ca=str(result.ca_cert)))
            if cluster is not None:
                others = [n.broker for n in cluster.spec.nodes if n.name != cluster.node.name]
                await asyncio.to_thread(add_brokers, result.client_config, others)

    async def _serve_cluster_pki(self, cluster: JoinBundle) -> None:
        """Answer the other nodes' supervisors with the cluster's PKI, sealed under the
        join key (mgmt.clusterinit), on a connection of its own for the stack's life:
        every node that has the PKI answers, so a node joins while any other is up."""
        pki = await asyncio.to_thread(read_pki, self.layout.pki)
        if pki is None:
            raise StackError("the cluster's PKI is incomplete under " + str(self.layout.pki.root))
        sealed = seal_pki(cluster, pki)
        nc = await natsrpc.connect(
            self.nats_url, name="kmsctl-cluster", connect_timeout=5, **self._kmsctl_bus()
        )

        async def answer(msg: Any) -> None:
            if msg.reply:
                await msg.respond(sealed)

        await nc.subscribe(CLUSTER_PKI_SUBJECT, cb=answer)
        self._pki_server = nc

    async def _fetch_cluster_pki(self, cluster: JoinBundle) -> None:
        """The PKI the first node's ceremony made, from whichever node answers (the
        first start of a node other than the first; later starts have it on disk)."""
        if await asyncio.to_thread(self._ceremony_done):
            return
        nc = await self._probe_connection()
        deadline = time.monotonic() + max(CLUSTER_WAIT_S, self.options.start_timeout)
        asked = 0
        while True:
            try:
                reply = await nc.request(CLUSTER_PKI_SUBJECT, b"", timeout=2)
                pki = open_pki(cluster, reply.data)
                break
            except KMSError as exc:
                # Not sealed under our join key: nothing is written, and we ask again.
                log.warning(
                    "refused an answer on the cluster's PKI", extra=fields(reason=exc.reason)
                )
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
                asked += 1
                if time.monotonic() > deadline:
                    raise StackError(
                        f"no node of cluster {cluster.spec.name!r} answered with its PKI in "
                        f"{CLUSTER_WAIT_S:g}s: start node {cluster.spec.first.name!r} "
                        "(it runs the ceremony)"
                    ) from None
                if asked % 15 == 1:
                    log.info(
                        "waiting for the cluster's PKI",
                        extra=fields(first=cluster.spec.first.name, error=type(exc).__name__),
                    )
                await asyncio.sleep(0.5)
        await asyncio.to_thread(write_pki, self.layout.pki, pki)
        log.info("cluster PKI received", extra=fields(cluster=cluster.spec.name))

    async def close_cluster(self) -> None:
        nc, self._pki_server = self._pki_server, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await nc.close()

    def _rotate_logs(self) -> None:
        rotate_and_report(
            self.layout.logs, self.options.log_max_bytes, self.options.log_backups, log
        )

    async def supervise(self) -> None:
        """Restart children that die; give up on one that dies too often; keep the logs
        within their size (mgmt.logrotate)."""
        ticks = 0
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=0.5)
            if self._stopping.is_set():
                return
            ticks += 1
            if ticks % 4 == 0:
                await asyncio.to_thread(self._rotate_logs)
                if await asyncio.to_thread(self._fleet_changed):
                    try:
                        await self._refresh_fleet()
                    except (KMSError, OSError, NatsServerError, nats.errors.Error) as exc:
                        # Tried again at the next look: the records still differ.
                        log.error("fleet refresh failed", extra=fields(error=type(exc).__name__))
                    self._write_state(True)
                try:
                    await self._refresh_peer_fleet()
                except (KMSError, OSError, NatsServerError, nats.errors.Error) as exc:
                    # Tried again at the next look: the sequence was not taken. A node
                    # without quorum gets here every look: a warning, not an error.
                    log.warning(
                        "fleet grant refresh failed", extra=fields(error=type(exc).__name__)
                    )
            if self.nats is not None and self.nats.process and self.nats.process.poll() is not None:
                log.warning("nats-server exited; restarting")
                self._start_nats()
                try:
                    await self._set_up_state()
                except (KMSError, OSError, NatsServerError, nats.errors.Error) as exc:
                    # The streams stay as they are (a service makes a missing bucket
                    # with the same settings); the grant is withdrawn regardless.
                    log.error("stack setup failed", extra=fields(error=type(exc).__name__))
                self._write_state(True)
            if self.swtpm is not None and not self.swtpm.running():
                log.warning("swtpm exited; restarting")
                self.swtpm.start()
            for child in self.children:
                assert child.process is not None
                code = child.process.poll()
                if code is None:
                    continue
                try:
                    delay = plan_restart(child.name, code, child.restarts, child.last_log_line)
                except WatchError as exc:
                    raise StackError(str(exc)) from None
                log.warning(
                    "child exited; restarting",
                    extra=fields(part=child.name, code=code, delay=delay),
                )
                await asyncio.sleep(delay)
                child.spawn()
                self._write_state(True)

    def lean_watch_refusal(self) -> str:
        """Why this supervisor must keep watching the stack itself ("": it may hand over
        to the lean watcher, mgmt.upwatch). Its loop has bus work for the stack's life
        on a cluster node (the PKI it answers for, the fleet registry it follows) and on
        a fleet hub (nats-server reloaded with each device added); a lean watcher
        without nats-py cannot do that."""
        if self.options.cluster is not None:
            return "a cluster node serves its PKI and follows the fleet registry on the bus"
        if self.options.leaf_listen:
            return "a fleet hub reloads nats-server with the devices added while it runs"
        return ""

    def handover(self) -> dict[str, Any]:
        """Everything mgmt.upwatch needs to watch this started stack: each child's pid,
        argv, environment, log and recent restarts (in start order), nats-server's and
        swtpm's, the state file's content, and the log rotation limits."""
        from mgmt.natsserver import find_binary

        assert self.nats is not None and self.nats.process is not None
        children = []
        for child in self.children:
            assert child.process is not None
            children.append(
                {
                    "name": child.name,
                    "argv": child.argv,
                    "env": child.env,
                    "log": str(child.log_path),
                    "pid": child.process.pid,
                    "restarts": child.restarts,
                }
            )
        nats = {
            "proc": {
                "name": "nats",
                "argv": [find_binary(), "-c", str(self.nats.conf_path)],
                "log": str(self.nats.log_path),
                "pid": self.nats.process.pid,
            },
            "host": self.nats.config.host,
            "port": self.nats.config.port,
        }
        swtpm: dict[str, Any] | None = None
        if self.swtpm is not None and self.swtpm.process is not None:
            config = self.swtpm.config
            swtpm = {
                "proc": {
                    "name": "swtpm",
                    "argv": config.argv(),
                    "log": str(self.swtpm.log_path),
                    "pid": self.swtpm.process.pid,
                },
                "sockets": (
                    [str(config.socket_path), str(config.ctrl_path)] if config.port is None else []
                ),
                "ctrl_port": config.ctrl_port if config.port is not None else None,
                "lock_tcti": config.tcti if config.lock_platform else "",
            }
        return {
            "state": self._state(True),
            "state_file": str(self.layout.state_file),
            "logs_dir": str(self.layout.logs),
            "log_max_bytes": self.options.log_max_bytes,
            "log_backups": self.options.log_backups,
            "children": children,
            "nats": nats,
            "swtpm": swtpm,
        }

    async def hand_over(self, become: Callable[[dict[str, Any]], None]) -> None:
        """Become the lean watcher (`become` exec's it and does not return), unless a
        stop was asked for meanwhile: then return, and the caller stops the stack.

        SIGINT/SIGTERM are blocked first and stay blocked through the exec (the watcher
        takes them with sigtimedwait), and the thread pool is shut down, so that a
        signal can neither reach a thread that would swallow it nor kill the process
        between the two halves. One that came before is seen here (the loop's
        handlers run during the yields) and stops the stack as before."""
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        await asyncio.get_running_loop().shutdown_default_executor()
        for _ in range(3):
            await asyncio.sleep(0)
        if self._stopping.is_set():
            return
        log.info("handing over to the lean watcher", extra=fields(pid=os.getpid()))
        try:
            become(self.handover())
        except OSError as exc:
            # The thread pool is gone: this process cannot supervise as before.
            raise StackError(f"the lean watcher could not be started: {exc}") from None
        raise StackError("the lean watcher returned")  # `become` must not return

    def request_stop(self) -> None:
        self._stopping.set()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._write_state(False)
        for child in reversed(self.children):
            child.stop()
        if self.swtpm is not None:
            self.swtpm.stop()
        if self.nats is not None:
            self.nats.stop()


async def _together(chains: list[Coroutine[Any, Any, None]]) -> None:
    """Run start-up chains side by side; the first failure cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(c) for c in chains]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _wait_port(host: str, port: int, seconds: float) -> None:
    """Until something accepts a TCP connection on host:port (StackError after `seconds`)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 0.5)
        except (OSError, TimeoutError):
            if time.monotonic() > deadline:
                raise StackError(f"nothing listening on {host}:{port} after {seconds:g}s") from None
            await asyncio.sleep(PROBE_INTERVAL)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


def _script(name: str) -> str:
    """A console script of this installation (beside the running interpreter)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


async def run_stack(
    options: StackOptions,
    on_ready: Callable[[Stack], None],
    become_watcher: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Start the stack, then watch it: here, or (given `become_watcher`, and unless
    Stack.lean_watch_refusal) in the lean watcher this process becomes (mgmt.upwatch)."""
    stack = Stack(options)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stack.request_stop)
    try:
        await stack.start()
        on_ready(stack)
        if become_watcher is not None and not stack.lean_watch_refusal():
            await stack.hand_over(become_watcher)
        await stack.supervise()
    finally:
        await stack.close_cluster()
        stack.stop()
