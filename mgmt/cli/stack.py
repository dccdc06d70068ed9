"""`kmsctl up`, `kmsctl init` and `kmsctl status`: running the system and checking it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from edgekms.errors import FailedPrecondition, KMSError, Unavailable
from edgekms.logs import fields, quiet_asyncio_tls_noise, setup_logging
from mgmt.cli.client_access import client_options, open_client
from mgmt.cli.common import ExitCode, client_config_path, data_dir_option, output_option
from mgmt.cli.output import echo_json, fail, handle_errors, table

if TYPE_CHECKING:
    from mgmt import stacklock
    from mgmt.clusterinit import JoinBundle
    from mgmt.pkcs11token import ExternalToken
    from mgmt.stack import StackOptions
    from mgmt.uplink import UplinkBundle

log = logging.getLogger("kmsctl.up")


# `--audit-limit crypto-*=SIZE`: every crypto service's stream not named on its own. A
# board's unit cannot name a cluster's other nodes' providers (hsm-<node>), yet its store
# must reserve every stream's copy (docs/security.md, "Sizing for a board").
CRYPTO_WILDCARD = "crypto-*"


def expand_crypto_limit(
    limits: dict[str, tuple[int, int]], providers: list[str]
) -> dict[str, tuple[int, int]]:
    """`limits` with a `crypto-*` entry given to each provider's writer not named."""
    limits = dict(limits)
    every = limits.pop(CRYPTO_WILDCARD, None)
    if every is not None:
        for provider in providers:
            limits.setdefault(f"crypto-{provider}", every)
    return limits


@dataclass(frozen=True)
class UpOptions:
    """Everything `kmsctl up` was given, as click parsed it: one field per option of `up`
    (same name as its parameter), so an option is declared once, in its decorator, and
    travels as one object. Adding an option: a decorator on `up` and a field here (a
    test checks the two agree); `stack_options` passes it on if the stack needs it."""

    data_dir: Path
    nats_port: int
    broker_listen: str
    enroll_listen: str
    ek_ca: Path | None
    attest_challenge_ttl: float
    mdns: bool
    mdns_interfaces: tuple[str, ...]
    tpm: str | None
    swtpm_port: int | None
    ca_http: str
    ca_base_url: str
    ca_provider: str
    acme_listen: str
    acme_names: tuple[str, ...]
    acme_config: Path | None
    spiffe_bundle_listen: str
    ca_crl_lifetime: str
    audit_limits: tuple[str, ...]
    max_file_store: str
    audit_window: float
    audit_max_age: int
    audit_archive_interval: float
    log_level: str
    log_format: str
    log_max_bytes: int
    log_backups: int
    start_timeout: float
    metrics_listen: str
    join: Path | None
    embedded: bool
    leaf_listen: str
    uplink: Path | None
    pkcs11_module: Path | None
    pkcs11_token_label: str
    pkcs11_pin_file: Path | None
    fleet_copy_limit: str

    def stack_options(
        self,
        audit_limits: dict[str, tuple[int, int]],
        max_file_store: int | None,
        cluster: JoinBundle | None = None,
        uplink: UplinkBundle | None = None,
        pkcs11: ExternalToken | None = None,
    ) -> StackOptions:
        """The supervisor's options (mgmt.stack); `audit_limits` and `max_file_store`
        already parsed; `cluster` the installed bundle of --join (the node's own
        provider is hsm-<node>); `uplink` the installed bundle of --uplink (a fleet
        device); `pkcs11` the checked --pkcs11-* token (None: a SoftHSM token)."""
        from mgmt.stack import StackOptions

        if cluster is not None:
            providers = cluster.spec.providers
        else:
            providers = ["hsm0", *(["tpm0"] if self.tpm else [])]
        audit_limits = expand_crypto_limit(audit_limits, providers)
        return StackOptions(
            cluster=cluster,
            provider_id=cluster.node.provider if cluster is not None else "hsm0",
            data_dir=self.data_dir,
            nats_port=self.nats_port,
            broker_listen=self.broker_listen,
            enroll_listen=self.enroll_listen,
            tpm=self.tpm,
            ca_http=self.ca_http,
            ca_base_url=self.ca_base_url,
            ca_provider=self.ca_provider,
            acme_listen=self.acme_listen,
            acme_names=self.acme_names,
            acme_config=self.acme_config,
            spiffe_bundle_listen=self.spiffe_bundle_listen,
            ca_crl_lifetime=self.ca_crl_lifetime,
            log_level=self.log_level.lower(),
            log_max_bytes=self.log_max_bytes,
            log_backups=self.log_backups,
            audit_limits=audit_limits,
            audit_window=self.audit_window,
            audit_max_age=float(self.audit_max_age),
            audit_archive_interval=self.audit_archive_interval,
            max_file_store=max_file_store,
            start_timeout=self.start_timeout,
            metrics_listen=self.metrics_listen,
            ek_ca=self.ek_ca.resolve() if self.ek_ca else None,
            attest_challenge_ttl=self.attest_challenge_ttl,
            embedded=self.embedded,
            leaf_listen=self.leaf_listen,
            uplink=uplink,
            pkcs11=pkcs11,
            fleet_copy_max_bytes=_fleet_copy_limit(self.fleet_copy_limit, self.leaf_listen),
            **({"token_label": pkcs11.label} if pkcs11 is not None else {}),
        )


@click.command()
@data_dir_option
@click.option("--nats-port", default=4222, show_default=True, help="Loopback port for NATS.")
@click.option(
    "--broker-listen",
    default="127.0.0.1:8443",
    show_default=True,
    help="Where the broker listens (host:port). Use 0.0.0.0:8443 to serve the LAN.",
)
@click.option(
    "--enroll-listen",
    default="",
    help="The broker's enrollment listener (server-only TLS, `kmsctl enroll` only). "
    "[default: the broker's host, its port + 1]",
)
@click.option(
    "--ek-ca",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="PEM bundle of TPM manufacturer CAs: an EK certificate chaining to one of them "
    "may enroll with `kmsctl enroll --attest` (docs/security.md, TPM-attested enrollment).",
)
@click.option(
    "--attest-challenge-ttl",
    type=click.FloatRange(2.0, 600.0),
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="How long a TPM challenge (enroll --attest, unlock fetch) may be answered. It "
    "lives in the broker's memory only: a broker restart ends every open one, and the "
    "device asks again.",
)
@click.option(
    "--mdns",
    is_flag=True,
    help="Announce the enrollment listener on the LAN as _edgekms._tcp (multicast DNS), "
    "for `kmsctl unlock fetch --mdns` on devices.",
)
@click.option(
    "--mdns-interface",
    "mdns_interfaces",
    multiple=True,
    metavar="IPV4",
    help="Announce on this interface address only (repeatable). [default: all]",
)
@click.option(
    "--tpm",
    default=None,
    metavar="swtpm|DEVICE|TCTI",
    help="Also run crypto service tpm0: `swtpm` starts a software TPM for development; "
    "on a board give the device (/dev/tpmrm0) or a TCTI string.",
)
@click.option(
    "--swtpm-port",
    type=int,
    default=None,
    hidden=True,
    help="Ignored: swtpm now listens on private Unix sockets (kept so old scripts run).",
)
@click.option(
    "--ca-http",
    default="127.0.0.1:8180",
    show_default=True,
    help="Where the CA serves its CRL, OCSP and CA certificates (host:port).",
)
@click.option(
    "--ca-base-url",
    default="",
    help="Base URL relying parties reach the CA at (e.g. http://nas.lan:8180); written "
    "into certificates as CRL distribution point and AIA. Empty: left out.",
)
@click.option(
    "--ca-provider",
    default="",
    help="The provider holding the mini-CA's keys (hsm0, or tpm0 with --tpm); the CA "
    "service may reach only this one. Default: hsm0.",
)
@click.option(
    "--acme",
    "acme_listen",
    default="",
    metavar="HOST:PORT",
    help="Also serve ACME (RFC 8555) over HTTPS here, for certbot, lego, acme.sh, Caddy "
    "and Traefik; its certificate comes from the mini-CA (after `kmsctl ca init`). The "
    "directory is https://HOST:PORT/acme/directory.",
)
@click.option(
    "--acme-name",
    "acme_names",
    multiple=True,
    metavar="NAME",
    help="A DNS name or IP address clients reach the ACME server by (repeatable; in its "
    "certificate). Default: the --acme host, or 127.0.0.1.",
)
@click.option(
    "--acme-config",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="TOML with the rest of the ACME settings: http01_port, tlsalpn01_port, [hosts], "
    'allow_dns, allow_ip, eab_required (docs/ca.md, "ACME").',
)
@click.option(
    "--spiffe-bundle-listen",
    default="",
    metavar="HOST:PORT",
    help="Also serve the SPIFFE trust domain's bundle endpoint over https_spiffe here "
    "(GET /spiffe/bundle; TLS with an X509-SVID spiffe://TD/edgekms/bundle-endpoint, "
    "after `kmsctl spiffe init`), as a SPIRE peer federates by default "
    '(docs/spiffe.md, "Federation").',
)
@click.option(
    "--ca-crl-lifetime",
    default="",
    metavar="DURATION",
    help="How long each CRL the CA signs is good for (1m..30d, e.g. 1d). Default 7d. "
    "Short CRLs need devices that fetch them often (`kmsctl agent`).",
)
@click.option(
    "--audit-limit",
    "audit_limits",
    multiple=True,
    metavar="WRITER=SIZE[/MESSAGES]",
    help="The most one audit writer's stream may hold (broker, ca, crypto-<id>, or "
    "crypto-* for every crypto service not named, every node's on a cluster; SIZE in "
    "B, KiB, MiB, GiB), e.g. --audit-limit broker=512MiB --audit-limit ca=64MiB/200000. "
    "Default: broker 2GiB, others 1GiB, 20000000 messages each. Beyond it that writer's "
    "appends, and the operations they record, are refused with audit.full; `kmsctl "
    "status` warns from 80%.",
)
@click.option(
    "--max-file-store",
    default="",
    metavar="SIZE",
    help="Cap JetStream's store at SIZE (B, KiB, MiB, GiB), e.g. 160MiB: past it writes "
    "are refused (an audit append: audit.full) while the disk keeps its room. Refused at "
    "start (nats.store_exceeds_disk) when the disk cannot hold it. Default: nats-server's "
    "own, 75% of the free space at start.",
)
@click.option(
    "--audit-window",
    type=click.FloatRange(min=0.01, max=0.8),
    default=0.5,
    show_default=True,
    metavar="FRACTION",
    help="Share of each audit stream's limit kept in the stream; the broker archives "
    "older entries to DATA_DIR/audit-archive (gzip segments, each with a checkpoint "
    "signed in the token) and then removes them from the stream. The rest of the limit "
    "is room for archiving to fall behind in.",
)
@click.option(
    "--audit-max-age",
    type=click.IntRange(min=0),
    default=7 * 24 * 3600,
    show_default=True,
    metavar="SECONDS",
    help="Archive audit entries older than this even if the window has room (0: by size only).",
)
@click.option(
    "--audit-archive-interval",
    type=click.FloatRange(min=0.5),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="How often the broker's archiver looks at every audit stream.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    help="Of `kmsctl up` and of every service it starts.",
)
@click.option(
    "--log-format",
    default="text",
    show_default=True,
    type=click.Choice(["text", "json"]),
    help="Of `kmsctl up`'s own lines on the console: text for people, json for a "
    "collector. The services' logs under DATA_DIR/logs are JSON lines either way.",
)
@click.option(
    "--log-max-bytes",
    default=10 * 1024 * 1024,
    show_default=True,
    type=click.IntRange(min=64 * 1024),
    help="Rotate a log under DATA_DIR/logs once it reaches this size.",
)
@click.option(
    "--log-backups",
    default=5,
    show_default=True,
    type=click.IntRange(min=0, max=100),
    help="Rotated copies kept per log (<name>.log.1 is the newest).",
)
@click.option(
    "--start-timeout",
    type=click.FloatRange(min=1.0),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="How long each service may take to become ready before kmsctl up gives up. "
    "Raise it on a slow board or under emulation (qemu-user: 20x).",
)
@click.option(
    "--metrics-listen",
    default="127.0.0.1:9464",
    show_default=True,
    envvar="EDGEKMS_METRICS_LISTEN",
    metavar="IP:PORT",
    help="Prometheus /metrics, /healthz and /readyz: the broker on this port, the CA on "
    "the next, then each crypto service (hsm0, tpm0). Loopback by default; port 0 picks "
    'free ports; "" serves none. `kmsctl status` lists them.',
)
@click.option(
    "--join",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    metavar="BUNDLE",
    help="Run this data dir as a node of a cluster, from its bundle (`kmsctl cluster "
    "init`): its provider is hsm-<node>, nats-server routes to the other nodes, every "
    "stream has one copy per node. The broker listens on the node's address and broker "
    "port unless --broker-listen is given. The bundle is copied into DATA_DIR/secrets.",
)
@click.option(
    "--embedded",
    is_flag=True,
    default=False,
    help="For a small board: run the broker and the CA service in one process (each "
    "keeps its own bus identity), ~28 MB less PSS under load. A compromised broker process "
    'also holds the CA\'s bus identity (docs/security.md, "Embedded mode"); the crypto '
    "services, which hold the tokens, stay processes of their own.",
)
@click.option(
    "--leaf-listen",
    default="",
    metavar="HOST:PORT",
    help="Run this stack as a fleet hub: take devices' leaf connections here (TLS with "
    "the hub's leaf certificate; each device logs in as its own narrow bus user, "
    "recorded by `kmsctl fleet add-device`). The hub keeps a copy of every device's "
    "audit that `kmsctl audit verify --device` checks. With --join, on one node of a "
    "cluster: the whole cluster is the hub (devices are added on that node, their copies "
    'kept on every node). See docs/cluster.md, "Fleet".',
)
@click.option(
    "--uplink",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    metavar="BUNDLE",
    help="Run this stack as a fleet device, from its uplink bundle (`kmsctl fleet "
    "add-device` at the hub): its own JetStream domain dev-<id>, its keys and services "
    "local, a leaf connection to the hub, which copies its audit. It keeps signing while "
    "the hub is away. The bundle is copied into DATA_DIR/secrets.",
)
@click.option(
    "--pkcs11-module",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="PATH",
    help="Use an existing PKCS#11 token instead of making a SoftHSM one: its module "
    "(on the board OP-TEE's /usr/lib/libckteec.so.0). Needs --pkcs11-token-label and "
    "--pkcs11-pin-file too; the token must be initialised already.",
)
@click.option(
    "--pkcs11-token-label",
    default="",
    metavar="LABEL",
    help="The existing token's label (the board's: edgekms), with --pkcs11-module.",
)
@click.option(
    "--pkcs11-pin-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE",
    help="File holding the existing token's user PIN, this user's and 0600 (the board's: "
    "/var/lib/edgekms/secrets/hsm0.pin), with --pkcs11-module. The PIN is taken from "
    "no command line or environment.",
)
@click.option(
    "--fleet-copy-limit",
    default="",
    metavar="SIZE",
    help="With --leaf-listen: the most the hub's copy of one device's audit may hold (B, "
    "KiB, MiB, GiB; default 1GiB). Past it the copy stops growing (what it holds stays "
    "verifiable); size it with --max-file-store on a small hub (a board: 8MiB).",
)
def up(**params: Any) -> None:
    """Run the embedded EdgeKMS in the foreground until Ctrl-C.

    \b
    Starts, each as its own process with a log under DATA_DIR/logs:
      nats-server     JetStream on a file store (DATA_DIR/nats); 2.10 or later
      SoftHSM token   created on first run (DATA_DIR/softhsm/softhsm2.conf), unless
                      --pkcs11-module names a token that exists (a board's OP-TEE)
      kms-crypto      provider hsm0, in front of the token
      kms-crypto      provider tpm0 in front of a TPM, with --tpm (swtpm or a device);
                      swtpm on 0600 Unix sockets, provisioned (`kmsctl tpm provision`)
      kmsctl ca serve the mini-CA on NATS, and HTTP for CRL/OCSP on --ca-http
                      (and ACME over HTTPS on --acme)
      kms-broker      gRPC with mutual TLS on --broker-listen, and device
                      enrollment (server-only TLS) on --enroll-listen
    With --embedded the broker and the CA service share one process.
    Once every part is ready, `kmsctl up` goes on as a small watcher in the same process
    (ps shows `python -m mgmt.upwatch`, same pid) that restarts what dies and stops
    everything on Ctrl-C; with --join, --leaf-listen or --mdns it stays as it is.
    The first start runs the bootstrap ceremony (`kmsctl init`): an internal CA whose
    key is generated inside the token, the broker's certificate and an admin client
    certificate, with a client config that every later command uses.

    \b
    Example:
      kmsctl up --data-dir ./kms &
      kmsctl status --data-dir ./kms

    
    One node of a cluster (docs/cluster.md):
      kmsctl up --data-dir /var/lib/edgekms --join bundles/nas1

    \b
    A fleet hub, and one of its devices (docs/cluster.md, "Fleet"):
      kmsctl up --data-dir /var/lib/edgekms --leaf-listen 0.0.0.0:7422
      kmsctl up --data-dir /var/lib/edgekms --uplink uplink-a1.toml

    \b
    On a board, with its provisioned OP-TEE token (any of the above):
      kmsctl up --data-dir /var/lib/edgekms/node --join /var/lib/edgekms/bundle \\
        --pkcs11-module /usr/lib/libckteec.so.0 --pkcs11-token-label edgekms \\
        --pkcs11-pin-file /var/lib/edgekms/secrets/hsm0.pin

    Exits 6 when the machine cannot run it as it is (a nats-server older than 2.10:
    `nats.server_too_old`), 8 when a part failed to start or died for good.
    """
    # nats-py imports aiohttp (its WebSocket transport) whenever it is installed: ~0.2 s
    # before nats-server can start, and ~10 MB kept, for a supervisor that dials tls://.
    # Blocked in this process only, before its first `import nats` (as kms-broker and
    # kms-crypto do); the CA service, which serves HTTP with aiohttp, is its own process.
    sys.modules.setdefault("aiohttp", None)  # type: ignore[arg-type]
    from mgmt import stacklock

    options = UpOptions(**params)
    # Absolute, as the children's command lines name it (a takeover recognises them so).
    options = replace(options, data_dir=options.data_dir.expanduser().resolve())
    setup_logging("kmsctl-up", options.log_level, options.log_format)
    # Options that are usage errors refuse before the lock, which makes DATA_DIR/run.
    _audit_limits(options.audit_limits)
    _max_file_store(options.max_file_store)
    _fleet_copy_limit(options.fleet_copy_limit, options.leaf_listen)
    _check_crl_lifetime(options.ca_crl_lifetime)
    options = _join_defaults(options)
    _fleet_checks(options)
    token = _external_token(options)
    # Before anything is imported, started or written (mgmt.stacklock): a second `up` on
    # a live data dir, or a port something else holds, is refused in a fraction of a
    # second and leaves the data dir as it was.
    try:
        lock = stacklock.acquire(options.data_dir / "run")
    except KMSError as exc:
        _refuse(exc)
    try:
        _token_of_data_dir(options.data_dir, token)
        _take_over_and_check(options, lock)
        if options.join is not None:
            _route_port_free(options.join)
        _leaf_port_free(options.leaf_listen)
        _check_metrics_ports(options.metrics_listen, options.tpm)
        from mgmt.pkcs11token import record_token

        # Every check passed: the data dir remembers its token from here on.
        record_token(options.data_dir, token)
        _run_up(options, token, lock.fd)
    finally:
        lock.release()


def _token_of_data_dir(data_dir: Path, token: ExternalToken | None) -> None:
    """Holding the lock: the data dir's token is the one given (exit 6 otherwise, nothing
    started or written; mgmt.pkcs11token)."""
    from mgmt.pkcs11token import check_data_dir

    try:
        check_data_dir(data_dir, token)
    except KMSError as exc:
        _refuse(exc)


def _external_token(options: UpOptions) -> ExternalToken | None:
    """--pkcs11-module, --pkcs11-token-label and --pkcs11-pin-file: all three or none,
    the module there, the PIN file this user's and 0600 (mgmt.pkcs11token); refused
    typed (exit 3) before the lock, so nothing starts and nothing is written."""
    from mgmt.pkcs11token import check_external

    try:
        return check_external(
            options.pkcs11_module, options.pkcs11_token_label, options.pkcs11_pin_file
        )
    except KMSError as exc:
        _refuse(exc)


def _join_defaults(options: UpOptions) -> UpOptions:
    """With --join: the bundle readable (exit 3 otherwise), --tpm refused (a TPM on a
    cluster node is not built), and the broker on the node's address unless
    --broker-listen was given. Without: refused (exit 6) on a data dir that is a node."""
    if options.join is None:
        from mgmt.clusterinit import CLUSTER_FILE, installed_dir

        joined = installed_dir(options.data_dir / "secrets") / CLUSTER_FILE
        if joined.exists():
            # Its store holds a cluster's Raft state and its sealing keys are the
            # cluster's: run alone it would be a second, diverging copy of the cluster.
            _refuse(
                FailedPrecondition(
                    "cluster.join_required",
                    f"{options.data_dir} is a cluster node: start it with --join and its bundle",
                    {"data_dir": str(options.data_dir)},
                )
            )
        return options
    if options.tpm:
        raise click.UsageError(
            "--tpm with --join: a TPM provider on a cluster node is not built yet"
        )
    from mgmt.clusterinit import CLUSTER_FILE, read_spec

    try:
        spec, name = read_spec(options.join / CLUSTER_FILE)
    except KMSError as exc:
        _refuse(exc)
    node = spec.node(name)
    source = click.get_current_context().get_parameter_source("broker_listen")
    if source is click.core.ParameterSource.DEFAULT:
        options = replace(options, broker_listen=node.broker)
    return options


def _route_port_free(bundle: Path) -> None:
    """The node's route port, like every other port, is free before anything starts."""
    from mgmt import stacklock
    from mgmt.clusterinit import CLUSTER_FILE, read_spec

    try:
        spec, name = read_spec(bundle / CLUSTER_FILE)
        node = spec.node(name)
        stacklock.check_ports({"--join (route port)": (node.host, node.route_port)})
    except KMSError as exc:
        _refuse(exc)


def _fleet_checks(options: UpOptions) -> None:
    """A stack is a fleet hub or a device, not both; a cluster node may be a hub (it takes
    leaf connections for the whole cluster) but not a device (not built yet); the hub's
    leaf address and the device's bundle sound: refused before the lock, like every usage
    error (exit 2; exit 3 for a bad bundle or address)."""
    from mgmt.uplink import check_address, read_bundle

    if options.leaf_listen and options.uplink is not None:
        raise click.UsageError("--leaf-listen and --uplink: a stack is a hub or a device")
    if options.join is not None and options.uplink is not None:
        raise click.UsageError(
            "--uplink with --join: a fleet device on a cluster node is not built yet "
            "(a node may be a fleet hub: --leaf-listen)"
        )
    if options.embedded and options.uplink is not None:
        # --embedded hosts the CA in the broker's process; a device runs no CA at all.
        raise click.UsageError(
            "--embedded with --uplink: a fleet device runs no CA (the hub's issues its "
            "certificates), so there is nothing to embed"
        )
    try:
        if options.leaf_listen:
            check_address(options.leaf_listen, "--leaf-listen")
        if options.uplink is not None:
            read_bundle(options.uplink)
    except KMSError as exc:
        _refuse(exc)


def _leaf_port_free(leaf_listen: str) -> None:
    """The hub's leaf port, like every other port, is free before anything starts."""
    from mgmt import stacklock
    from mgmt.uplink import check_address

    if not leaf_listen:
        return
    try:
        stacklock.check_ports({"--leaf-listen": check_address(leaf_listen, "--leaf-listen")})
    except KMSError as exc:
        _refuse(exc)


def _check_metrics_ports(metrics_listen: str, tpm: str | None) -> None:
    """Each service's metrics port is free (or the value is refused), before anything
    starts, as for the other ports (mgmt.stacklock)."""
    from mgmt import stacklock

    parts = stacklock.metrics_parts(["hsm0", *(["tpm0"] if tpm else [])])
    try:
        addresses = stacklock.metrics_addresses(metrics_listen, parts)
        if metrics_listen and not metrics_listen.endswith(":0"):
            stacklock.check_ports(
                {f"--metrics-listen ({part})": where for part, where in addresses.items()}
            )
    except KMSError as exc:
        _refuse(exc)


def _refuse(exc: KMSError) -> NoReturn:
    fail(exc)


def _take_over_and_check(options: UpOptions, lock: stacklock.StackLock) -> None:
    """Holding the lock, no live supervisor runs on this data dir: end what a killed one
    left running there, then check that every port the stack needs is free."""
    from mgmt import stacklock

    data_dir = options.data_dir
    reaped = stacklock.reap_orphans(data_dir)
    # The last supervisor's state (perhaps "ready", with dead pids) no longer holds.
    (data_dir / "run" / stacklock.STATE_NAME).unlink(missing_ok=True)
    if lock.previous_pid is not None or reaped:
        log.warning(
            "took over the data dir of a stopped supervisor",
            extra=fields(previous_pid=lock.previous_pid, ended=reaped),
        )
    try:
        broker = stacklock.split_listen("--broker-listen", options.broker_listen)
        acme_listen = options.acme_listen
        extra = {"--acme": stacklock.split_listen("--acme", acme_listen)} if acme_listen else {}
        bundle_listen = options.spiffe_bundle_listen
        if bundle_listen:
            extra["--spiffe-bundle-listen"] = stacklock.split_listen(
                "--spiffe-bundle-listen", bundle_listen
            )
        stacklock.check_ports(
            {
                **extra,
                "--nats-port": ("127.0.0.1", options.nats_port),
                "--broker-listen": broker,
                # Its default: the broker's host, the port after the broker's (mgmt.stack).
                "--enroll-listen": stacklock.split_listen(
                    "--enroll-listen", options.enroll_listen or f"{broker[0]}:{broker[1] + 1}"
                ),
                "--ca-http": stacklock.split_listen("--ca-http", options.ca_http),
            }
        )
    except KMSError as exc:
        _refuse(exc)


def _run_up(up_options: UpOptions, token: ExternalToken | None = None, lock_fd: int = -1) -> None:
    from mgmt.stack import StackError, run_stack

    cluster = None
    if up_options.join is not None:
        from mgmt.clusterinit import install_bundle

        try:
            cluster = install_bundle(up_options.join, up_options.data_dir / "secrets")
        except KMSError as exc:
            _refuse(exc)
        if cluster.route_tls is None:
            # A bundle from before route TLS still runs, so a cluster is not cut off by
            # an upgrade; its routes carry the cluster's messages in plain text.
            log.warning(
                "cluster routes without TLS: the bundle has no route certificate",
                extra=fields(
                    cluster=cluster.spec.name,
                    node=cluster.node.name,
                    fix="kmsctl cluster add-node makes bundles with route certificates",
                ),
            )
    uplink = None
    if up_options.uplink is not None:
        from mgmt.uplink import install_bundle as install_uplink

        try:
            uplink = install_uplink(up_options.uplink, up_options.data_dir)
        except KMSError as exc:
            _refuse(exc)
    options = up_options.stack_options(
        _audit_limits(up_options.audit_limits),
        _max_file_store(up_options.max_file_store),
        cluster,
        uplink,
        token,
    )
    data_dir, ca_provider = up_options.data_dir, up_options.ca_provider
    if up_options.swtpm_port is not None:
        click.echo(
            "kmsctl up: --swtpm-port is ignored: swtpm listens on Unix sockets only this user"
            " may open (DATA_DIR/swtpm/swtpm.sock)",
            err=True,
        )
    if ca_provider and ca_provider not in options.all_providers:
        raise click.UsageError(f"--ca-provider {ca_provider}: no such provider in this stack")

    from mgmt import stackstate

    pointer: list[Path] = []
    announced: list[Any] = []
    mdns_interfaces = list(up_options.mdns_interfaces) if up_options.mdns else None

    def announce_mdns() -> None:
        """_edgekms._tcp for the enrollment listener (off the event loop: zeroconf's
        registration blocks while it probes the name)."""
        from mgmt.mdns import Announcement

        host, _, port = up_options.broker_listen.rpartition(":")
        target = up_options.enroll_listen or f"{host}:{int(port) + 1}"
        e_host, _, e_port = target.rpartition(":")
        try:
            announced.append(
                Announcement(
                    f"edgekms-{socket.gethostname()}", e_host, int(e_port), mdns_interfaces
                )
            )
            log.info("announced on mDNS", extra=fields(service="_edgekms._tcp", port=e_port))
        except Exception as exc:  # a LAN without multicast must not stop the KMS
            log.warning("mDNS announcement failed", extra=fields(error=str(exc)[:200]))

    def ready(stack: object) -> None:
        # So that kmsctl, given no data dir, finds this stack (mgmt.stackstate).
        with contextlib.suppress(OSError):
            pointer.append(stackstate.announce(data_dir))
        if mdns_interfaces is not None:
            threading.Thread(target=announce_mdns, name="mdns", daemon=True).start()
        click.echo(
            f"EdgeKMS is up: broker {options.broker_listen}, NATS 127.0.0.1:{options.nats_port}, "
            f"data in {data_dir}. Client config: {client_config_path(data_dir)}. "
            + (f"Metrics from {up_options.metrics_listen}. " if up_options.metrics_listen else "")
            + "Ctrl-C stops.",
            err=True,
        )

    def become_watcher(handover: dict[str, Any]) -> None:
        """Once the stack is up, this process becomes the lean watcher (mgmt.upwatch,
        standard library only): same pid, the data dir's lock handed on, our pointer
        withdrawn by it when it stops. Not with --mdns: the announcement lives in this
        process (zeroconf)."""
        from mgmt.upwatch import exec_watcher

        handover = {
            **handover,
            "pointers": [str(p) for p in pointer],
            "log_level": up_options.log_level.lower(),
            "log_format": up_options.log_format,
        }
        exec_watcher(handover, lock_fd)

    lean = mdns_interfaces is None and lock_fd >= 0
    try:
        asyncio.run(run_stack(options, ready, become_watcher if lean else None))
    except StackError as exc:
        click.echo(f"kmsctl: {exc}", err=True)
        sys.exit(ExitCode.UNAVAILABLE)
    except FailedPrecondition as exc:
        # Waiting will not help (e.g. nats.server_too_old): the machine needs changing.
        click.echo(f"kmsctl: {exc}", err=True)
        sys.exit(ExitCode.FAILED_PRECONDITION)
    except KMSError as exc:
        click.echo(f"kmsctl: {exc}", err=True)
        sys.exit(ExitCode.UNAVAILABLE)
    finally:
        for path in pointer:
            stackstate.withdraw(path)
        for announcement in announced:
            with contextlib.suppress(Exception):
                announcement.close()
    click.echo("EdgeKMS stopped.", err=True)


@click.command()
@data_dir_option
@click.option(
    "--nats-url",
    default=None,
    help="The bus.  [default: the running stack's, from DATA_DIR/run/state.json, else "
    "nats://127.0.0.1:4222]",
)
@click.option("--provider", default="hsm0", show_default=True, help="Where the CA key is made.")
@click.option(
    "--broker-address",
    default=None,
    help="host:port clients dial, written into the client config. On an initialised data "
    "dir the config keeps its address unless this is given.  [default: the running "
    "stack's, else 127.0.0.1:8443]",
)
@click.option(
    "--broker-name",
    "broker_names",
    multiple=True,
    default=("localhost", "127.0.0.1"),
    show_default=True,
    help="Extra DNS names / IPs for the broker's certificate (repeat).",
)
@click.option(
    "--new-admin",
    is_flag=True,
    help="Issue another admin certificate for an internal CA that exists (this data dir "
    "lost its client config, or a second machine). Never done without it.",
)
@click.option("--nats-user", envvar="EDGEKMS_NATS_USER", help="Bus identity (default: kmsctl's).")
@click.option(
    "--nats-password-file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="EDGEKMS_NATS_PASSWORD_FILE",
    help="File holding that identity's password (never pass it on the command line).",
)
@click.option(
    "--nats-ca",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="EDGEKMS_NATS_CA",
    help="CA certificate of the bus's TLS.",
)
@output_option
@handle_errors
def init(
    data_dir: Path,
    nats_url: str | None,
    provider: str,
    broker_address: str | None,
    broker_names: tuple[str, ...],
    new_admin: bool,
    nats_user: str | None,
    nats_password_file: Path | None,
    nats_ca: Path | None,
    output: str,
) -> None:
    """Run the bootstrap ceremony (once; later runs change nothing).

    Needs NATS and the crypto service PROVIDER running (`kmsctl up` runs this for you).
    On a bus with credentials, it uses --nats-user/--nats-password-file/--nats-ca, or
    else the `kmsctl` identity that `kmsctl up` made under DATA_DIR.
    The internal CA key is generated inside the token and never leaves it; the
    broker's certificate and the first admin's client certificate are issued from it,
    and DATA_DIR/client/config.toml is written for every later command.

    \b
    On a data dir that is initialised already it changes nothing: the client config
    keeps its broker address unless --broker-address is given, and no admin
    certificate is issued again unless --new-admin is given (exit 5 otherwise).
    """
    from edgekms.sealed import WRITER_CEREMONY
    from mgmt.natsauth import BusCredentials, local_credentials
    from mgmt.pki import run_ceremony
    from mgmt.sealkeys import local_seal
    from mgmt.stackstate import read_state

    state = read_state(data_dir) or {}
    if nats_url is None:
        nats_url = str(state.get("nats_url") or "nats://127.0.0.1:4222")
    if broker_address is None and isinstance(state.get("broker"), str):
        # A new config points at the stack that runs here; an existing one stays as is.
        fresh = not client_config_path(data_dir).exists()
        broker_address = str(state["broker"]).replace("0.0.0.0", "127.0.0.1") if fresh else None
    if nats_user or nats_password_file:
        credentials = BusCredentials(nats_user, nats_password_file, nats_ca)
    else:
        credentials = local_credentials(data_dir)
    logging.getLogger("nats.aio.client").addFilter(_one_line_bus_errors)
    quiet_asyncio_tls_noise()
    try:
        result = asyncio.run(
            run_ceremony(
                nats_url,
                provider,
                data_dir / "pki",
                data_dir / "client",
                broker_address=broker_address,
                broker_names=list(broker_names),
                nats_options=credentials.connect_options(),
                # The ceremony's record-sealing key, if `kmsctl up` made the keys here.
                seal=local_seal(data_dir / "secrets", WRITER_CEREMONY),
                new_admin=new_admin,
            )
        )
    except Unavailable as exc:
        if exc.reason == "bus.refused":
            # Not down: someone else's bus (the lost user, whose stack runs on
            # another data dir, met it on the default port 4222).
            raise Unavailable(
                exc.reason,
                f"{exc.message}. It is not the bus of {data_dir}: if a `kmsctl up` runs "
                "elsewhere, give kmsctl that one's --data-dir (or EDGEKMS_DATA_DIR), where "
                "it has initialised already; for services you run yourself, give their "
                "--nats-url, --nats-user, --nats-password-file and --nats-ca.",
                exc.details,
            ) from None
        if exc.reason != "bus.unavailable":
            raise
        raise Unavailable(
            exc.reason,
            f"{exc.message}. `kmsctl up` runs the ceremony itself: is it running on "
            f"{data_dir}? (start it with `kmsctl up --data-dir {data_dir}`). For services "
            "you run yourself, give their bus with --nats-url and its credentials.",
            exc.details,
        ) from None
    if output == "json":
        echo_json(
            {
                "created": result.created,
                "ca_cert": str(result.ca_cert),
                "client_config": str(result.client_config),
            }
        )
    elif result.created:
        click.echo(f"Internal CA ready: {result.ca_cert}\nClient config: {result.client_config}")
    else:
        click.echo(f"Already initialised: {result.client_config}")


def _one_line_bus_errors(record: logging.LogRecord) -> bool:
    """nats-py logs each failed dial with a traceback, and the one-line error `init`
    ends with says it: those are dropped, and so is the server's refusal of our
    credentials (`bus.refused` names it). What the bus refused later (a permissions
    violation) stays, as one line."""
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        if isinstance(exc, OSError | TimeoutError):
            return False
        if "authorization violation" in str(exc).lower():
            return False
        record.msg, record.args = f"nats: {exc}", ()
        record.exc_info = None
    return True


def _check_crl_lifetime(value: str) -> None:
    """--ca-crl-lifetime outside 1m..30d is a usage error (exit 2)."""
    if not value:
        return
    from edgekms.durations import parse_crl_lifetime
    from edgekms.errors import InvalidArgument

    try:
        parse_crl_lifetime(value)
    except InvalidArgument as exc:
        raise click.BadParameter(exc.message, param_hint="--ca-crl-lifetime") from None


def _max_file_store(value: str) -> int | None:
    """--max-file-store as bytes (None: not given); a malformed one is a usage error."""
    if not value:
        return None
    from edgekms.audit import parse_size

    try:
        size = parse_size(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: want a size such as 160MiB (B, KiB, MiB, GiB)",
            param_hint="--max-file-store",
        ) from None
    if size < 1024 * 1024:
        raise click.BadParameter(f"{value!r}: at least 1MiB", param_hint="--max-file-store")
    return size


def _fleet_copy_limit(value: str, leaf_listen: str) -> int | None:
    """--fleet-copy-limit as bytes (None: not given, the 1 GiB default); only for a hub,
    at least a stream's minimum: a usage error (exit 2) otherwise."""
    if not value:
        return None
    from edgekms.audit import MIN_STREAM_BYTES, parse_size

    if not leaf_listen:
        raise click.UsageError("--fleet-copy-limit is a hub's: it needs --leaf-listen")
    try:
        size = parse_size(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: want a size such as 8MiB (B, KiB, MiB, GiB)",
            param_hint="--fleet-copy-limit",
        ) from None
    if size < MIN_STREAM_BYTES:
        raise click.BadParameter(
            f"{value!r}: at least {MIN_STREAM_BYTES} bytes", param_hint="--fleet-copy-limit"
        )
    return size


def _audit_limits(values: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """--audit-limit values by writer; a malformed one is a usage error (exit 2)."""
    from edgekms.audit import parse_limit
    from edgekms.errors import InvalidArgument

    out: dict[str, tuple[int, int]] = {}
    for value in values:
        every_crypto = value.startswith(CRYPTO_WILDCARD + "=")
        if every_crypto:
            # Parsed as one crypto writer's; stack_options gives it to each provider's.
            value = "crypto-any" + value.removeprefix(CRYPTO_WILDCARD)
        try:
            writer, max_bytes, max_msgs = parse_limit(value)
            writer = CRYPTO_WILDCARD if every_crypto else writer
        except InvalidArgument as err:
            raise click.BadParameter(
                f"{err.reason}: {err.message}", param_hint="--audit-limit"
            ) from None
        out[writer] = (max_bytes, max_msgs)
    return out


@click.command()
@client_options
@output_option
def status(data_dir: Path, config_path: Path | None, output: str) -> None:
    """Is everything answering? Exit 0 only if the broker, the bus, every crypto
    service and the CA answer and no audit writer's stream is full; 8 (unavailable)
    otherwise. A service that lost its bus connection does not answer (and exits, so
    that `kmsctl up` restarts it). One audit/<writer> line per audit stream: WARN from
    80% of its limit, FULL when that writer's appends (and what they record) are
    refused with audit.full."""
    with open_client(data_dir, config_path, timeout=5) as client:
        response = client.status()
    metrics = _metrics_endpoints(data_dir)
    if output == "json":
        echo_json(
            {
                "ok": response.ok,
                "components": [
                    {"name": c.name, "ok": c.ok, "detail": c.detail} for c in response.components
                ],
                "metrics": metrics,
            }
        )
    else:
        rows = [[c.name, _state(c.name, c.ok, c.detail), c.detail] for c in response.components]
        click.echo(table(["component", "status", "detail"], rows))
        if metrics:
            click.echo("metrics (/healthz and /readyz beside each):")
            for part, url in metrics.items():
                click.echo(f"  {part:<14} {url}")
    if not response.ok:
        sys.exit(ExitCode.UNAVAILABLE)


def _metrics_endpoints(data_dir: Path) -> dict[str, str]:
    """part -> /metrics URL, from the state file of a `kmsctl up` on this data dir; {}
    when none runs there or its services serve no metrics."""
    from mgmt import stackstate

    state = stackstate.read_state(data_dir.expanduser())
    found = state.get("metrics") if state else None
    if not isinstance(found, dict):
        return {}
    return {str(k): str(v) for k, v in found.items()}


def _state(name: str, ok: bool, detail: str) -> str:
    """ok, WARN (an audit stream nearly full), FULL (a writer's appends are refused),
    or DOWN."""
    if ok:
        return "WARN" if detail.startswith("warning") else "ok"
    return "FULL" if name.startswith("audit/") and detail.startswith("FULL") else "DOWN"


def register(cli: click.Group) -> None:
    cli.add_command(up)
    cli.add_command(init)
    cli.add_command(status)
