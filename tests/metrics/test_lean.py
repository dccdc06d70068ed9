"""prometheus-client is loaded only by a service that serves metrics: importing a
service's entry point does not load it (a board config without metrics_listen never
does), and the metrics module itself loads it only when a registry is made."""

from __future__ import annotations

from pathlib import Path

from tests.test_lean_imports import loaded_after, packages


def test_service_entry_points_do_not_load_prometheus_client() -> None:
    loaded = packages(
        loaded_after(
            "import crypto_service.__main__",
            "import broker.__main__",
            "import ca_service.service",
            "import edgekms.metrics",
        )
    )
    assert {"crypto_service", "broker", "ca_service", "edgekms"} <= loaded
    assert "prometheus_client" not in loaded


def test_a_registry_loads_it() -> None:
    loaded = packages(
        loaded_after("from edgekms.metrics import ServiceMetrics", "ServiceMetrics('x')")
    )
    assert "prometheus_client" in loaded


def test_a_broker_without_metrics_listen_does_not_load_it(tmp_path: Path) -> None:
    """The containers' and the board's broker.toml have no metrics_listen, and their
    images have no prometheus-client: making the broker must not need it (it once made
    its registry unconditionally and the compose stack's broker died at start)."""
    config = tmp_path / "broker.toml"
    config.write_text(
        'listen = "127.0.0.1:8443"\nnats_url = "nats://127.0.0.1:4222"\n'
        'default_provider = "hsm0"\nproviders = ["hsm0"]\n'
        '[tls]\ncert = "broker.crt"\nkey = "broker.key"\nclient_ca = "ca.crt"\n'
    )
    loaded = packages(
        loaded_after(
            "from broker.config import load_config",
            "from broker.server import Broker",
            f"broker = Broker(load_config(__import__('pathlib').Path({str(config)!r})))",
            "assert broker.metrics is None",
        )
    )
    assert "broker" in loaded
    assert "prometheus_client" not in loaded
