"""The bus connection state as a scraper sees it (issue 14, item 3), on real parts: a
broker with its metrics endpoint on its own nats-server, SoftHSM token and crypto
service. When nats-server goes away, `/readyz` turns 503 naming the bus and
`edgekms_bus_connected` drops to 0 while `/healthz` (the process) stays 200; when it is
back on the same port and store, both recover and the broker signs again."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest

from edgekms.errors import KMSError, Unavailable
from mgmt.natsserver import free_port
from tests.conftest import SLOWDOWN
from tests.e2e.conftest import Parts, running_parts


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5 * SLOWDOWN) as answer:  # noqa: S310
            return int(answer.status), answer.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def _bus_gauge(base: str) -> float | None:
    status, text = _get(f"{base}/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith("edgekms_bus_connected"):
            return float(line.rsplit(" ", 1)[1])
    return None


def _until(condition: Callable[[], bool], what: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds * SLOWDOWN
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds}s: {what}"
        time.sleep(0.2)


def test_readyz_and_the_bus_gauge_follow_the_bus(tmp_path: Path) -> None:
    port = free_port()

    class MeteredParts(Parts):
        broker_extra: ClassVar[str] = f'metrics_listen = "127.0.0.1:{port}"\n'

    base = f"http://127.0.0.1:{port}"
    with running_parts(tmp_path, MeteredParts) as parts:
        with parts.client() as client:
            client.create_key("bus/p256", "ec-p256")
        _until(lambda: _get(f"{base}/readyz") == (200, "ready\n"), "ready at first")
        assert _bus_gauge(base) == 1.0

        parts.nats.stop()
        _until(
            lambda: _get(f"{base}/readyz") == (503, "not ready: bus not connected\n"),
            "/readyz to say the bus is gone",
        )
        # The text is rendered at most twice a second: the next rendering shows it.
        _until(lambda: _bus_gauge(base) == 0.0, "edgekms_bus_connected 0")
        assert _get(f"{base}/healthz") == (200, "ok\n")  # the process itself is fine
        with parts.client() as client, pytest.raises(KMSError) as refused:
            client.sign("bus/p256", b"no bus")
        # Refused as unavailable (try again), here by the audit write that comes first.
        assert isinstance(refused.value, Unavailable)
        assert refused.value.reason in ("audit.unavailable", "bus.unavailable")

        parts.nats.start(timeout=15.0 * SLOWDOWN)
        _until(lambda: _get(f"{base}/readyz") == (200, "ready\n"), "ready again")
        _until(lambda: _bus_gauge(base) == 1.0, "edgekms_bus_connected 1 again")

        def signs() -> bool:
            try:
                with parts.client() as client:
                    return client.verify("bus/p256", b"back", client.sign("bus/p256", b"back"))
            except KMSError:
                return False  # the crypto service may still be reconnecting

        _until(signs, "a signature after the bus came back")
