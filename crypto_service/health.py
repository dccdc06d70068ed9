"""The crypto service's metrics and readiness: its requests, its bus connection, and
whether its token answers (the TPM's dictionary-attack lockout with it).

The token is asked every PROBE_INTERVAL seconds on the provider's own threads, never per
scrape: a flood of scrapes must not become a flood of token commands (a TPM takes one
command at a time, and the signs would wait behind them).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from crypto_service.providers.base import ReportsHealth
from edgekms.errors import KMSError
from edgekms.metrics import ServiceMetrics

if TYPE_CHECKING:
    from crypto_service.providers.base import Provider

PROBE_INTERVAL = 10.0


class TokenHealth:
    """Gauges edgekms_token_up and, for a TPM, edgekms_tpm_lockout_counter,
    edgekms_tpm_max_auth_fail and edgekms_tpm_in_lockout; kept by `probe()`."""

    def __init__(self, metrics: ServiceMetrics, provider: Provider, provider_id: str) -> None:
        self.provider = provider
        self.provider_id = provider_id
        self.kind = str(getattr(provider, "kind", "unknown"))
        self.up = False
        self.last_error = "not probed yet"
        service = metrics.service
        labels = ("provider", "kind")
        self._up = metrics.gauge(
            "edgekms_token_up", "1 while the token answered its last probe.", labels
        ).labels(service, provider_id, self.kind)
        self._probed = metrics.gauge(
            "edgekms_token_last_probe_timestamp_seconds",
            "When the token was last probed (answered or not).",
            labels,
        ).labels(service, provider_id, self.kind)
        self._tpm: dict[str, object] = {}
        if self.kind == "tpm2":
            for name, doc in (
                ("lockout_counter", "The TPM's dictionary-attack failure counter."),
                ("max_auth_fail", "Failures the TPM takes before it locks out."),
                ("in_lockout", "1 while the TPM is in dictionary-attack lockout."),
            ):
                self._tpm[name] = metrics.gauge(f"edgekms_tpm_{name}", doc, ("provider",)).labels(
                    service, provider_id
                )

    async def probe(self) -> None:
        """Ask the token once (on a thread: token calls block) and set the gauges."""
        if not isinstance(self.provider, ReportsHealth):
            self.up, self.last_error = True, ""
            self._up.set(1)
            return
        try:
            figures = await asyncio.to_thread(self.provider.health)
        except KMSError as exc:
            self.up, self.last_error = False, f"{exc.reason}: {exc.message}"
        except Exception as exc:
            self.up, self.last_error = False, type(exc).__name__
        else:
            self.up, self.last_error = True, ""
            for name, value in figures.items():
                gauge = self._tpm.get(name)
                if gauge is not None:
                    gauge.set(value)  # type: ignore[attr-defined]
        self._up.set(1 if self.up else 0)
        self._probed.set(time.time())
