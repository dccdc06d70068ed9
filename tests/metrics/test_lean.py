"""prometheus-client is loaded only by a service that serves metrics: importing a
service's entry point does not load it (a board config without metrics_listen never
does), and the metrics module itself loads it only when a registry is made."""

from __future__ import annotations

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
