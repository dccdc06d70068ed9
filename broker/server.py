"""Assemble and run the broker: NATS connection, key registry, gRPC server with mTLS,
the standard health service and server reflection (v1 and v1alpha, broker.reflection).

The server requires a client certificate chaining to the internal CA: a connection
without one, or with another CA's, fails in the TLS handshake before any handler runs.
Health reports SERVING only while the bus is connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import grpc
import grpc.aio
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from nats.aio.client import Client as NATS

from broker import reflection, wire
from broker.archiver import Archiver, InternalKeySigner
from broker.attest import ChallengeBook, ManufacturerCAs
from broker.audit_service import AuditService
from broker.ca_forward import SERVICE as CA_SERVICE
from broker.ca_forward import CAForwarder
from broker.clients import AccessGate, ClientRegistry, ClientService
from broker.config import BrokerConfig
from broker.devices import DeviceStore
from broker.enrollment import DeviceService, EnrollmentService
from broker.hub_ca import HubCA
from broker.idempotency import IdempotencyStore
from broker.keys import IdentityCache, KeyService, SystemService
from broker.metrics import AuditChainCheck, MetricsInterceptor
from broker.registry import KeyRegistry
from broker.throttle import FailureThrottle
from edgekms import natsrpc
from edgekms.audit import AuditWriter
from edgekms.crypto_client import CryptoClient
from edgekms.errors import Unavailable
from edgekms.fleet_ca import device_inbox
from edgekms.logs import fields
from edgekms.metrics import MetricsServer, Periodic, ServiceMetrics, serve_metrics
from edgekms.subjects import KEY_CLASS_INTERNAL
from edgekms.v1 import (
    audit_pb2,
    clients_pb2,
    enroll_pb2,
    keys_pb2,
)

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    keys_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name,
    keys_pb2.DESCRIPTOR.services_by_name["SystemService"].full_name,
    audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
    CA_SERVICE.full_name,
    clients_pb2.DESCRIPTOR.services_by_name["ClientService"].full_name,
    enroll_pb2.DESCRIPTOR.services_by_name["DeviceService"].full_name,
)
ENROLL_SERVICE = enroll_pb2.DESCRIPTOR.services_by_name["EnrollmentService"]
# Largest gRPC message accepted: an Ed25519 message of 64 KiB plus the envelope.
MAX_MESSAGE = 256 * 1024
# Largest gRPC message sent: a SignBatch's reply (broker/sign_many.py, 1,000 items) of
# RSA-4096 signatures is 512 KiB plus each item's key name; the request stays small.
MAX_REPLY = 1024 * 1024


class Broker:
    def __init__(self, config: BrokerConfig):
        self.config = config
        self.nc: NATS | None = None
        # A fleet device's connection for the hub's CA (hub_ca_device), else None.
        self.hub_nc: NATS | None = None
        self.server: grpc.aio.Server | None = None
        # The enrollment listener (server-only TLS), when configured.
        self.enroll_server: grpc.aio.Server | None = None
        # The audit archiver (broker/archiver.py), when this broker archives.
        self.archiver: Archiver | None = None
        self.archive_task: asyncio.Task[None] | None = None
        self.enroll_port: int = 0
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.registry: KeyRegistry | None = None
        self.clients: ClientRegistry | None = None
        self.port: int = 0
        # Set when the bus connection closes for good: serve() then exits non-zero.
        self.bus_watch = natsrpc.BusWatch("the broker")
        # /metrics, /healthz, /readyz (edgekms.metrics, broker.metrics), only where the
        # config asks for them: without metrics_listen (the board's and the containers'
        # configs) prometheus-client is neither needed nor imported.
        self.metrics: ServiceMetrics | None = None
        if config.metrics_listen:
            self.metrics = ServiceMetrics("broker")
            self.metrics.bus_gauge(lambda: self.nc is not None and bool(self.nc.is_connected))
        self.metrics_server: MetricsServer | None = None
        self.audit_check: Periodic | None = None
        self.serving = False

    def not_ready(self) -> list[str]:
        """/readyz: listening, with the bus connected."""
        problems = [] if self.serving else ["not listening yet"]
        if self.nc is None or not self.nc.is_connected:
            problems.append("bus not connected")
        return problems

    async def _set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def _on_disconnect(self) -> None:
        log.warning("bus disconnected")
        await self._set_serving(False)

    async def _on_reconnect(self) -> None:
        log.info("bus reconnected")
        await self._set_serving(True)

    async def _bus_check(self) -> str:
        if self.nc is None or not self.nc.is_connected:
            raise Unavailable("bus.unavailable", "not connected to NATS")
        try:
            info = await self.nc.jetstream().account_info()
        except Exception as exc:
            raise Unavailable("bus.jetstream_unavailable", f"JetStream: {exc}") from None
        where = self.nc.connected_url.netloc if self.nc.connected_url else ""
        return f"{where} streams={info.streams}"

    async def start(self) -> None:
        cfg = self.config
        # First, so that /healthz answers (and /readyz says why not) while the rest starts.
        if self.metrics is not None:
            self.metrics_server = await serve_metrics(
                self.metrics, self.not_ready, cfg.metrics_listen
            )
        self.nc = await natsrpc.connect(
            cfg.nats_url,
            name="kms-broker",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=5,
            disconnected_cb=self._on_disconnect,
            reconnected_cb=self._on_reconnect,
            allow_reconnect=True,
            **self.bus_watch.options(),
            **cfg.bus.connect_options(),
        )
        hub = None
        if cfg.hub_ca_device:
            # A second connection whose replies come back on the device's inbox, the
            # only replies the hub sends down the leaf connection (broker.hub_ca).
            self.hub_nc = await natsrpc.connect(
                cfg.nats_url,
                name="kms-broker-hub-ca",
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                connect_timeout=5,
                **{
                    **cfg.bus.connect_options(),
                    "inbox_prefix": device_inbox(cfg.hub_ca_device),
                },
            )
            hub = HubCA(self.hub_nc, cfg.hub_ca_device)
        self.registry = KeyRegistry(self.nc.jetstream(), replicas=cfg.replicas, seal=cfg.seal)
        # The audit stream exists before the first request: no decision goes unrecorded.
        audit = AuditWriter(
            self.nc.jetstream(), "broker", limit=cfg.audit_limit, replicas=cfg.replicas
        )

        async def audit_stream() -> None:
            try:
                await audit.ensure_stream()
            except Exception as exc:
                raise Unavailable("audit.unavailable", f"no audit stream: {exc}") from None

        crypto = CryptoClient(self.nc, default_timeout=cfg.sign_timeout, nodes=cfg.provider_nodes)
        # Clients, revocations and the failure throttle, consulted on every request.
        self.clients = ClientRegistry(self.nc.jetstream(), replicas=cfg.replicas, seal=cfg.seal)
        identities = IdentityCache(gate=AccessGate(self.clients, FailureThrottle()))
        # Request ids of state-changing calls (broker/idempotency.py).
        idempotency = IdempotencyStore(self.nc.jetstream(), replicas=cfg.replicas)
        # Each is a few JetStream round trips of its own: opened side by side, the broker
        # listens sooner. All of them finish before it listens; the first failure stops it.
        opened = await asyncio.gather(
            self.registry.start(),
            audit_stream(),
            self.clients.start(),
            idempotency.start(),
            return_exceptions=True,
        )
        for outcome in opened:
            if isinstance(outcome, BaseException):
                raise outcome

        self.server = grpc.aio.server(
            interceptors=[MetricsInterceptor(self.metrics)] if self.metrics else [],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_REPLY),
                ("grpc.so_reuseport", 0),
                ("grpc.server_handshake_timeout_ms", int(cfg.handshake_timeout * 1000)),
                ("grpc.max_connection_idle_ms", int(cfg.idle_timeout * 1000)),
                ("grpc.keepalive_time_ms", int(cfg.keepalive_interval * 1000)),
                ("grpc.keepalive_timeout_ms", int(cfg.keepalive_timeout * 1000)),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        # Unary services go through broker.wire so undecodable requests get a typed error.
        wire.register(
            self.server,
            KeyService(cfg, self.registry, crypto, identities, audit, idempotency),
            keys_pb2.DESCRIPTOR.services_by_name["KeyService"],
            keys_pb2,
        )
        system = SystemService(cfg, self.registry, crypto, identities, self._bus_check, audit)
        wire.register(
            self.server,
            system,
            keys_pb2.DESCRIPTOR.services_by_name["SystemService"],
            keys_pb2,
        )
        wire.register(
            self.server,
            AuditService(self.nc.jetstream(), audit, identities, archive_dir=cfg.audit_archive_dir),
            audit_pb2.DESCRIPTOR.services_by_name["AuditService"],
            audit_pb2,
        )
        client_service = ClientService(
            cfg,
            self.registry,
            self.clients,
            # Client certificates are signed with the internal CA's key, a key of
            # class "internal", through that class's subjects.
            CryptoClient(
                self.nc,
                default_timeout=cfg.sign_timeout,
                key_class=KEY_CLASS_INTERNAL,
                nodes=cfg.provider_nodes,
            ),
            identities,
            audit,
        )
        wire.register(
            self.server,
            client_service,
            clients_pb2.DESCRIPTOR.services_by_name["ClientService"],
            clients_pb2,
        )
        device_store = DeviceStore(self.clients.kv, self.clients.devices)
        wire.register(
            self.server,
            DeviceService(self.nc, self.clients, client_service, device_store, identities, audit),
            enroll_pb2.DESCRIPTOR.services_by_name["DeviceService"],
            enroll_pb2,
        )
        self.server.add_generic_rpc_handlers(
            (CAForwarder(self.nc, identities, idempotency, audit, hub).handler(),)
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable(self.server, (*SERVICE_NAMES, health.SERVICE_NAME))
        credentials = grpc.ssl_server_credentials(
            [(cfg.tls.key.read_bytes(), cfg.tls.cert.read_bytes())],
            root_certificates=cfg.tls.client_ca.read_bytes(),
            require_client_auth=True,
        )
        self.port = self.server.add_secure_port(cfg.listen, credentials)
        if self.port == 0:
            raise Unavailable("broker.listen_failed", f"cannot listen on {cfg.listen}")
        if cfg.enroll_listen:
            await self._start_enrollment(client_service, device_store, audit, crypto)
        await self.server.start()
        if cfg.audit_archive_dir is not None:
            internal = CryptoClient(
                self.nc, default_timeout=cfg.sign_timeout, key_class=KEY_CLASS_INTERNAL
            )
            self.archiver = Archiver(
                self.nc.jetstream(),
                cfg.audit_archive_dir,
                InternalKeySigner(self.registry, internal, cfg.sign_timeout),
                cfg.retention,
                audit=audit,
            )
            system.archiver = self.archiver
            self.archive_task = asyncio.create_task(self.archiver.run())
        await self._set_serving(True)
        self.serving = True
        if self.metrics is not None and cfg.audit_check_interval > 0:
            check = AuditChainCheck(self.nc.jetstream(), self.metrics, self.archiver)
            self.audit_check = Periodic(
                "audit chain check", check.run_once, cfg.audit_check_interval
            )
            self.audit_check.start()
        log.info("broker ready", extra=fields(listen=cfg.listen, port=self.port))

    async def _start_enrollment(
        self,
        issuer: ClientService,
        store: DeviceStore,
        audit: AuditWriter,
        crypto: CryptoClient | None = None,
    ) -> None:
        """The enrollment listener: server-only TLS (a device has no client certificate
        yet), EnrollmentService and health only, so nothing else is reachable without a
        certificate. Its chain carries the internal CA, for the device to pin by
        fingerprint on first contact (docs/security.md, "Enrollment")."""
        cfg = self.config
        assert self.clients is not None
        leaf = x509.load_pem_x509_certificate(cfg.tls.cert.read_bytes())
        try:
            names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            server_name = (names.get_values_for_type(x509.DNSName) or [""])[0]
        except x509.ExtensionNotFound:
            server_name = ""
        self.enroll_server = grpc.aio.server(
            interceptors=[MetricsInterceptor(self.metrics)] if self.metrics else [],
            options=[
                ("grpc.max_receive_message_length", 64 * 1024),
                ("grpc.max_send_message_length", 64 * 1024),
                ("grpc.so_reuseport", 0),
                ("grpc.server_handshake_timeout_ms", int(cfg.handshake_timeout * 1000)),
                ("grpc.max_connection_idle_ms", int(cfg.idle_timeout * 1000)),
            ],
        )
        wire.register(
            self.enroll_server,
            EnrollmentService(
                self.clients,
                issuer,
                store,
                self.port,
                server_name,
                audit,
                ek_cas=ManufacturerCAs.load(cfg.ek_ca_file),
                challenges=ChallengeBook(ttl=cfg.attest_challenge_ttl),
                crypto=crypto,
            ),
            ENROLL_SERVICE,
            enroll_pb2,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.enroll_server)
        chain = cfg.tls.cert.read_bytes().rstrip() + b"\n" + cfg.tls.client_ca.read_bytes()
        credentials = grpc.ssl_server_credentials(
            [(cfg.tls.key.read_bytes(), chain)], require_client_auth=False
        )
        self.enroll_port = self.enroll_server.add_secure_port(cfg.enroll_listen, credentials)
        if self.enroll_port == 0:
            raise Unavailable("broker.listen_failed", f"cannot listen on {cfg.enroll_listen}")
        await self.enroll_server.start()
        log.info("enrollment ready", extra=fields(listen=cfg.enroll_listen, port=self.enroll_port))

    async def stop(self, grace: float = 5.0) -> None:
        self.serving = False
        await self._set_serving(False)
        if self.archive_task is not None:
            self.archive_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.archive_task
        if self.audit_check is not None:
            await self.audit_check.stop()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        if self.enroll_server is not None:
            await self.enroll_server.stop(grace)
        if self.server is not None:
            await self.server.stop(grace)
        if self.registry is not None:
            await self.registry.stop()
        if self.clients is not None:
            await self.clients.stop()
        self.bus_watch.stopping()
        if self.hub_nc is not None and not self.hub_nc.is_closed:
            await self.hub_nc.drain()
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.drain()


async def serve(config: BrokerConfig, stop: asyncio.Event | None = None) -> None:
    """Run the broker until `stop` is set, or, without one, until SIGINT/SIGTERM. A host
    process running other services beside it (mgmt.embedded) owns the signals and passes
    its own event."""
    broker = Broker(config)
    await broker.start()
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    await natsrpc.first_of(stop, broker.bus_watch.lost)
    log.info("broker stopping")
    await broker.stop()
    if broker.bus_watch.lost.is_set():
        raise broker.bus_watch.error()
