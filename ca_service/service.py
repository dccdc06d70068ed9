"""The CA service (`kmsctl ca serve`): answers kms.ca.<Operation> on NATS with ca.proto
messages, for the broker's CertificateAuthority gRPC service, and serves relying
parties over HTTP (ca_service.http). It keeps the CRL fresh in the background.

Errors leave as nats.micro service errors whose payload is the edgekms.v1.Error, as the
crypto services answer, so the broker turns them into the same gRPC status.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from ca_service.acme.admin import AcmeAdmin
from ca_service.acme.settings import AcmeConfig
from ca_service.authority import CertificateAuthority
from ca_service.builder import CaUrls
from ca_service.crl import CRL_VALIDITY
from ca_service.fleet import DeviceCA
from ca_service.profiles import load_profiles
from ca_service.replies import inbox_only
from ca_service.signer import KMSKeyBackend
from ca_service.spiffe import SpiffeAuthority
from ca_service.store import CAStore
from edgekms import natsrpc
from edgekms.audit import StreamLimit
from edgekms.busauth import BusCredentials
from edgekms.errors import KMSError
from edgekms.metrics import ServiceMetrics, serve_metrics
from edgekms.sealed import RecordSeal
from edgekms.subjects import CA_BUCKET, CA_PREFIX, CA_SERVICE_NAME, ca_subject
from edgekms.v1 import ca_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = CA_SERVICE_NAME
SERVICE_VERSION = "0.1.0"
QUEUE_GROUP = CA_PREFIX
CRL_CHECK_INTERVAL = 3600.0
MAX_IN_FLIGHT = 32
# The CA's audit writer name: its entries go to kms.audit.ca (mgmt.natsauth grants it).
SERVICE_NAME_AUDIT = "ca"


def operations(
    ca: CertificateAuthority, acme: AcmeAdmin | None = None
) -> dict[str, tuple[type[Message], natsrpc.Handler]]:
    """RPC name -> (request message type, handler); the subject is kms.ca.<RPC name>."""
    admin = acme or AcmeAdmin(None)
    spiffe = SpiffeAuthority(ca)

    async def get_crl(req: ca_pb2.GetCRLRequest) -> ca_pb2.GetCRLResponse:
        return await ca.crl_chunk(req)

    async def get_ca_certs(_: ca_pb2.GetCACertificatesRequest) -> Message:
        return await ca.ca_certificates()

    async def list_profiles(_: ca_pb2.ListProfilesRequest) -> Message:
        return ca.list_profiles()

    async def get_root_crl(_: ca_pb2.GetRootCRLRequest) -> Message:
        return await ca.root_crl()

    async def get_issuer_crl(req: ca_pb2.GetIssuerCRLRequest) -> Message:
        return await ca.issuer_crl(req.key_id)

    return {
        "Init": (ca_pb2.InitCARequest, ca.init),
        "IssueCertificate": (ca_pb2.IssueCertificateRequest, ca.issue),
        "GetCertificate": (ca_pb2.GetCertificateRequest, ca.get),
        "ListCertificates": (ca_pb2.ListCertificatesRequest, ca.list),
        "RevokeCertificate": (ca_pb2.RevokeCertificateRequest, ca.revoke),
        "RenewCertificate": (ca_pb2.RenewCertificateRequest, ca.renew),
        "GetCRL": (ca_pb2.GetCRLRequest, get_crl),
        "GetCACertificates": (ca_pb2.GetCACertificatesRequest, get_ca_certs),
        "ListProfiles": (ca_pb2.ListProfilesRequest, list_profiles),
        "GetRootCRL": (ca_pb2.GetRootCRLRequest, get_root_crl),
        "GetIssuerCRL": (ca_pb2.GetIssuerCRLRequest, get_issuer_crl),
        "RevokeIntermediate": (ca_pb2.RevokeIntermediateRequest, ca.revoke_intermediate),
        "Rotate": (ca_pb2.RotateCARequest, ca.rotate),
        "PruneCertificates": (ca_pb2.PruneCertificatesRequest, ca.prune),
        "RenewHeldCertificate": (ca_pb2.RenewHeldCertificateRequest, ca.renew_held),
        "ListAcmeAccounts": (ca_pb2.ListAcmeAccountsRequest, admin.list_accounts),
        "CreateAcmeEab": (ca_pb2.CreateAcmeEabRequest, admin.create_eab),
        "ListAcmeEab": (ca_pb2.ListAcmeEabRequest, admin.list_eab),
        "RevokeAcmeEab": (ca_pb2.RevokeAcmeEabRequest, admin.revoke_eab),
        "GetAcmePolicy": (ca_pb2.GetAcmePolicyRequest, admin.policy),
        "SpiffeInit": (ca_pb2.SpiffeInitRequest, spiffe.init),
        "SpiffeCreateEntry": (ca_pb2.SpiffeCreateEntryRequest, spiffe.create_entry),
        "SpiffeGetEntry": (ca_pb2.SpiffeGetEntryRequest, spiffe.get_entry),
        "SpiffeListEntries": (ca_pb2.SpiffeListEntriesRequest, spiffe.list_entries),
        "SpiffeDeleteEntry": (ca_pb2.SpiffeDeleteEntryRequest, spiffe.delete_entry),
        "SpiffeSignX509Svid": (ca_pb2.SpiffeSignX509SvidRequest, spiffe.sign_x509),
        "SpiffeSignJwtSvid": (ca_pb2.SpiffeSignJwtSvidRequest, spiffe.sign_jwt),
        "SpiffeGetBundle": (ca_pb2.SpiffeGetBundleRequest, spiffe.bundle),
        "SpiffeFederate": (ca_pb2.SpiffeFederateRequest, spiffe.federate),
        "SpiffeUnfederate": (ca_pb2.SpiffeUnfederateRequest, spiffe.unfederate),
        "SpiffeRotate": (ca_pb2.SpiffeRotateRequest, spiffe.rotate),
    }


class CAService:
    """The nats.micro side: each request runs as its own task (bounded), so slow token
    signatures for one caller do not queue everybody else behind them."""

    def __init__(
        self,
        nc: Any,
        ca: CertificateAuthority,
        concurrency: int = MAX_IN_FLIGHT,
        acme: AcmeAdmin | None = None,
        observe: Callable[[str, str, float], None] | None = None,
        fleet: DeviceCA | None = None,
    ):
        self.nc = nc
        self.ca = ca
        self.acme = acme
        # Certificate requests from fleet devices across their leaf links (ca_service.fleet).
        self.fleet = fleet
        self._responder = natsrpc.Responder("the CA service", concurrency, observe)
        self._service: Any = None

    async def start(self) -> CAService:
        from nats import micro

        self._service = await micro.add_service(
            self.nc,
            name=SERVICE_NAME,
            version=SERVICE_VERSION,
            description="EdgeKMS certificate authority",
            queue_group=QUEUE_GROUP,
        )
        for name, (request_type, handler) in operations(self.ca, self.acme).items():
            await self._service.add_endpoint(
                name=name,
                subject=ca_subject(name),
                handler=inbox_only(self._responder.endpoint(name, request_type, handler)),
            )
        if self.fleet is not None:
            await self.fleet.register(self._service, self._responder)
        await natsrpc.subscriptions_live(self.nc)
        log.info("event=ca_service_started endpoints=%d", len(operations(self.ca)))
        return self

    async def stop(self) -> None:
        # On a connection closed for good there is nothing to unsubscribe from.
        if self._service is not None and not self.nc.is_closed:
            await self._service.stop()
        await self._responder.drain()


async def add_ca_service(
    nc: Any,
    ca: CertificateAuthority,
    acme: AcmeAdmin | None = None,
    observe: Callable[[str, str, float], None] | None = None,
    fleet: DeviceCA | None = None,
) -> CAService:
    """Register every CA operation as a nats.micro endpoint on kms.ca.<Operation> (and,
    with `fleet`, the devices' kms.ca.device.*.IssueCertificate)."""
    return await CAService(nc, ca, acme=acme, observe=observe, fleet=fleet).start()


async def keep_crl_fresh(ca: CertificateAuthority, interval: float = CRL_CHECK_INTERVAL) -> None:
    """Rebuild the current CRL at start (a revocation taken just before a crash may not
    have reached one), then keep every CRL fresh before its nextUpdate, even when nothing
    is revoked, and drop retired intermediates whose certificates have all expired."""
    try:
        await ca.rebuild_crl()
    except KMSError as exc:
        log.info("event=ca_crl_refresh_skipped reason=%s", exc.reason)
    while True:
        await asyncio.sleep(interval)
        try:
            await ca.refresh()
        except KMSError as exc:  # no CA yet, or the token is away: try again later
            log.info("event=ca_crl_refresh_skipped reason=%s", exc.reason)


@dataclass(frozen=True)
class ServeConfig:
    nats_url: str
    http_host: str = "127.0.0.1"
    http_port: int = 8180
    # Base of the URLs put into certificates (CRL DP, AIA); empty: none.
    base_url: str = ""
    profiles_file: Path | None = None
    bucket: str = CA_BUCKET
    # The CA's bus identity (mgmt.natsauth); the default is an open bus.
    bus: BusCredentials = field(default_factory=BusCredentials)
    # Record sealing (edgekms.sealed): the CA's key and every writer's public key; None
    # only on a development bus (`kmsctl up` always seals).
    seal: RecordSeal | None = None
    # ACME over HTTPS (ca_service.acme); None: no ACME.
    acme: AcmeConfig | None = None
    # How long each CRL is good for (ca.toml crl_lifetime; ca_service.crl.CRL_VALIDITY).
    crl_validity: datetime.timedelta = CRL_VALIDITY
    # Its audit stream's limits where it creates that stream itself (ca.toml
    # audit_max_bytes/audit_max_msgs, the board); None: edgekms.audit's defaults.
    audit_limit: StreamLimit | None = None
    # Copies of the bucket or audit stream the CA creates (a cluster: 3); what exists
    # keeps its own (edgekms.kvstore).
    replicas: int = 1
    # Where /metrics, /healthz and /readyz are served (edgekms.metrics); None: nowhere.
    metrics_listen: str | None = None
    # A hub's CA (ca.toml fleet = true): also answer fleet devices' certificate requests
    # on kms.ca.device.<id>.IssueCertificate, within the hub's device registry.
    fleet: bool = False
    # Our SPIFFE bundle endpoint over https_spiffe (ca_service.spiffe_endpoint), its own
    # listener; None: only the plain HTTP and the ACME (https_web) ones serve it.
    spiffe_bundle_listen: tuple[str, int] | None = None


async def serve(config: ServeConfig, stop: asyncio.Event | None = None) -> None:
    """Run the CA service until `stop` is set (or forever). Raises Unavailable
    ("bus.lost") if the bus connection closes for good, so the process exits and its
    supervisor starts it again. The metrics endpoint starts first, so that /healthz
    answers (and /readyz says why not) while the rest starts."""
    # Metrics only where the config asks for them: without metrics_listen no registry,
    # no periodic CRL and expiry figures, and prometheus-client is not imported.
    status = _Status(ServiceMetrics("ca") if config.metrics_listen else None)
    endpoint = None
    if status.metrics is not None:
        endpoint = await serve_metrics(status.metrics, status.not_ready, config.metrics_listen)
    try:
        await _serve(config, stop, status)
    finally:
        if endpoint is not None:
            await endpoint.stop()


class _Status:
    """What /metrics and /readyz read: the registry, the bus connection, serving or not."""

    def __init__(self, metrics: ServiceMetrics | None) -> None:
        self.metrics = metrics
        self.nc: Any = None
        self.serving = False
        if metrics is not None:
            metrics.bus_gauge(self.bus_connected)

    def bus_connected(self) -> bool:
        return self.nc is not None and bool(self.nc.is_connected)

    def not_ready(self) -> list[str]:
        """/readyz: serving, with the bus connected."""
        problems = [] if self.serving else ["not serving yet"]
        if not self.bus_connected():
            problems.append("bus not connected")
        return problems


async def _serve(config: ServeConfig, stop: asyncio.Event | None, status: _Status) -> None:
    from ca_service.health import COMPUTE_INTERVAL, CAHealth
    from ca_service.http import start_http
    from edgekms.crypto_client import CryptoClient
    from edgekms.metrics import Periodic
    from edgekms.registry_record import RegistryKeys
    from edgekms.subjects import KEY_CLASS_CA

    metrics = status.metrics
    watch = natsrpc.BusWatch("the CA service")
    nc = await natsrpc.connect(
        config.nats_url,
        name=SERVICE_NAME,
        # Keep reconnecting through a bus restart, however long (kmsctl up restarts it).
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        **watch.options(),
        **config.bus.connect_options(),
    )
    status.nc = nc
    try:
        store = await CAStore.open(nc.jetstream(), config.bucket, config.seal, config.replicas)
        ca = CertificateAuthority(
            store,
            # The CA's keys are of class "ca": only this service may use them.
            KMSKeyBackend(CryptoClient(nc, key_class=KEY_CLASS_CA), asyncio.get_running_loop()),
            load_profiles(config.profiles_file),
            CaUrls.from_base(config.base_url),
            registry=await RegistryKeys.open(nc, SERVICE_NAME, "ca.key_disabled", config.seal),
            crl_validity=config.crl_validity,
        )
        acme = None
        audit = None
        if config.acme is not None or config.fleet:
            from edgekms.audit import AuditWriter

            audit = AuditWriter(
                nc.jetstream(),
                SERVICE_NAME_AUDIT,
                limit=config.audit_limit,
                replicas=config.replicas,
            )
            # kmsctl up makes the stream first; a CA run on its own makes it (the CA's bus
            # grant allows creating KMS_AUDIT, nothing else).
            await audit.ensure_stream()
        if config.acme is not None and audit is not None:
            from ca_service.acme.server import AcmeServer

            acme = AcmeServer(ca, config.acme, audit)
        admin = AcmeAdmin(acme.store, acme) if acme is not None else None
        fleet = DeviceCA(ca, nc.jetstream(), audit) if config.fleet and audit is not None else None
        service = await add_ca_service(
            nc,
            ca,
            admin,
            observe=metrics.observe if metrics is not None else None,
            fleet=fleet,
        )
        runner = await start_http(ca, config.http_host, config.http_port)
        if acme is not None:
            await acme.start()
        bundle_endpoint = None
        if config.spiffe_bundle_listen is not None:
            from ca_service.spiffe_endpoint import SpiffeBundleEndpoint

            bundle_endpoint = SpiffeBundleEndpoint(ca, *config.spiffe_bundle_listen)
            await bundle_endpoint.start()
        # Checked at least four times per CRL lifetime, so a short one never runs out.
        interval = min(CRL_CHECK_INTERVAL, config.crl_validity.total_seconds() / 4)
        refresher = asyncio.create_task(keep_crl_fresh(ca, interval))
        health = None
        if metrics is not None:
            health = Periodic("ca health", CAHealth(metrics, ca).compute, COMPUTE_INTERVAL)
            health.start()
        status.serving = True
        log.info(
            "event=ca_serving nats=%s http=%s:%d",
            config.nats_url,
            config.http_host,
            config.http_port,
        )
        try:
            await natsrpc.first_of(stop or asyncio.Event(), watch.lost)
        finally:
            status.serving = False
            if health is not None:
                await health.stop()
            refresher.cancel()
            try:
                await refresher
            except asyncio.CancelledError:
                pass
            except Exception as exc:
                # It died with the connection (its first CRL rebuild was on the bus when
                # the bus went): the loss itself is what serve() reports below.
                log.info("event=ca_crl_refresh_ended error=%s", type(exc).__name__)
            await ca.crl_jobs.stop()
            if acme is not None:
                await acme.stop()
            if bundle_endpoint is not None:
                await bundle_endpoint.stop()
            await runner.cleanup()
            await service.stop()
        if watch.lost.is_set():
            raise watch.error()
    finally:
        watch.stopping()
        if not nc.is_closed:
            await nc.drain()
