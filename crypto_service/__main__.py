"""`kms-crypto --config FILE`: run one crypto service until SIGTERM or SIGINT.

Exit codes are for supervisors (systemd, compose): 0 clean stop, 2 bad config (a
metrics_listen port another program holds included),
3 the token refused us (wrong PIN, no such token), 4 NATS unreachable. Each failure
prints one line on stderr that says what to fix; logs go to stderr as JSON lines
(edgekms.logs) with key=value messages.
"""

from __future__ import annotations

import sys

# nats-py imports aiohttp (its WebSocket transport) whenever it is installed: ~10 MB of
# resident memory this service never uses (it dials tls://). Blocking it must happen
# before the first `import nats`; only this entry point does it, never the library.
sys.modules.setdefault("aiohttp", None)  # type: ignore[arg-type]

import asyncio  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
from pathlib import Path  # noqa: E402

import click  # noqa: E402
import nats  # noqa: E402
import nats.errors  # noqa: E402

from crypto_service.config import (  # noqa: E402
    ConfigError,
    ServiceConfig,
    load_config,
    make_provider,
)
from crypto_service.health import PROBE_INTERVAL, TokenHealth  # noqa: E402
from crypto_service.providers.base import Provider  # noqa: E402
from crypto_service.service import CryptoService  # noqa: E402
from crypto_service.throttle import STATE_FILE, AuthGuard  # noqa: E402
from edgekms import aio, natsrpc  # noqa: E402
from edgekms.errors import KMSError  # noqa: E402
from edgekms.logs import setup_logging  # noqa: E402
from edgekms.metrics import Periodic, ServiceMetrics, serve_metrics  # noqa: E402

log = logging.getLogger("crypto_service")

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_TOKEN = 3
EXIT_NATS = 4
CONNECT_DEADLINE = 5.0


class _Exit(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def _serve(config: ServiceConfig, provider: Provider) -> None:
    # Closed for good (an -ERR from the server): exit so the supervisor restarts us.
    watch = natsrpc.BusWatch(f"crypto service {config.provider_id}")

    async def on_disconnect() -> None:
        log.warning("event=nats_disconnected")

    async def on_reconnect() -> None:
        log.info("event=nats_reconnected")

    try:
        bus_options = config.bus.connect_options()
    except KMSError as exc:
        raise _Exit(EXIT_CONFIG, exc.message) from None
    # nats-py retries a first connect as often as later reconnects (forever, here), so the
    # first connect gets its own deadline: a service that cannot reach the bus says so.
    try:
        nc = await asyncio.wait_for(
            nats.connect(
                servers=[config.nats_url],
                name=f"kms-crypto-{config.provider_id}",
                connect_timeout=2,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                **watch.options(),
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                **bus_options,
            ),
            timeout=CONNECT_DEADLINE,
        )
    except (Exception, TimeoutError) as exc:
        raise _Exit(
            EXIT_NATS, f"cannot reach NATS at {config.nats_url}: {type(exc).__name__}"
        ) from None

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    guard = None
    if config.tpm2 is not None:
        # The TPM's failure counter outlives this process; so must the guard's counts.
        guard = AuthGuard.for_provider(provider, config.tpm2.state_dir / STATE_FILE)
    from edgekms.audit import AuditWriter

    # This service's own audit writer: it records the refusals of keys used through
    # another class's subjects (docs/security.md, "Keys bound to their owners").
    audit = AuditWriter(
        nc.jetstream(),
        f"crypto-{config.provider_id}",
        limit=config.audit_limit,
        replicas=config.replicas,
    )
    try:
        # Its own stream (edgekms.audit: one per writer); `kmsctl up` makes it first.
        await audit.ensure_stream()
    except (KMSError, nats.errors.Error, TimeoutError) as exc:
        # Refusals are still refused; only their audit entries would fail (logged).
        log.error("event=audit_stream_missing error=%s", type(exc).__name__)
    # Metrics only where the config asks for them (edgekms.metrics): without
    # metrics_listen no registry, no token probe, and prometheus-client is not imported.
    metrics = ServiceMetrics(f"crypto-{config.provider_id}") if config.metrics_listen else None
    token = TokenHealth(metrics, provider, config.provider_id) if metrics else None

    def not_ready() -> list[str]:
        """/readyz: the bus connected and the token answering its last probe."""
        problems = [] if nc.is_connected else ["bus not connected"]
        if token is not None and not token.up:
            problems.append(f"token {config.provider_id}: {token.last_error}")
        return problems

    service = CryptoService(
        nc,
        provider,
        config.provider_id,
        config.workers,
        auth_guard=guard,
        audit=audit,
        observe=metrics.observe if metrics else None,
    )
    prober = Periodic("token probe", token.probe, PROBE_INTERVAL) if token else None
    endpoint = None
    try:
        if metrics is not None:
            metrics.bus_gauge(lambda: bool(nc.is_connected))
            try:
                endpoint = await serve_metrics(metrics, not_ready, config.metrics_listen)
            except KMSError as exc:
                raise _Exit(EXIT_CONFIG, exc.message) from None
        if prober is not None:
            prober.start()
        await service.start()
        await natsrpc.first_of(stop, watch.lost)
        log.info("event=stopping")
    finally:
        if prober is not None:
            await prober.stop()
        if endpoint is not None:
            await endpoint.stop()
        await service.stop()
        watch.stopping()
        try:
            if not nc.is_closed:
                await nc.drain()
        except Exception as exc:
            log.warning("event=drain_failed error=%s", type(exc).__name__)
    if watch.lost.is_set():
        raise _Exit(EXIT_NATS, watch.error().message)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML config of this crypto service.",
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
def main(config_path: Path, log_level: str) -> None:
    """Serve one key provider (a PKCS#11 token or a TPM) on NATS."""
    setup_logging("kms-crypto", log_level)
    try:
        config = load_config(config_path)
        provider = make_provider(config)
    except ConfigError as exc:
        click.echo(f"kms-crypto: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    except KMSError as exc:
        click.echo(f"kms-crypto: {exc.message}", err=True)
        sys.exit(EXIT_TOKEN)
    except ImportError as exc:
        click.echo(f"kms-crypto: provider code missing: {exc}", err=True)
        sys.exit(EXIT_TOKEN)
    code = EXIT_OK
    try:
        aio.run(_serve(config, provider))
    except _Exit as exc:
        click.echo(f"kms-crypto: {exc.message}", err=True)
        code = exc.code
    finally:
        provider.close()
    log.info("event=exit code=%d", code)
    sys.exit(code)


if __name__ == "__main__":
    main()
