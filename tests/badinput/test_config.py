"""Broken configuration for a real kms-crypto process: it exits 2 naming the file and the
field, and never registers on the bus, so nothing half-started answers requests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from edgekms.crypto_client import CryptoClient
from edgekms.errors import Unavailable
from mgmt.natsserver import NatsServer
from tests.conftest import TokenInfo
from tests.crypto.conftest import CryptoProcess, write_config
from tests.logevents import has_event

EDITS: dict[str, tuple[Callable[[str], str], str]] = {
    "not_toml": (lambda text: text.replace("[pkcs11]", "[pkcs11"), "TOML"),
    "provider_id_missing": (
        lambda text: "\n".join(x for x in text.splitlines() if not x.startswith("provider_id")),
        "provider_id",
    ),
    "sessions_not_a_number": (
        lambda text: text.replace("sessions = 4", 'sessions = "four"'),
        "sessions",
    ),
}


@pytest.mark.parametrize("case", list(EDITS))
async def test_bad_crypto_config_exits_2_and_never_registers(
    case: str,
    tmp_path: Path,
    nats_server: NatsServer,
    softhsm_token: TokenInfo,
    client: CryptoClient,
) -> None:
    edit, field = EDITS[case]
    provider = f"hsmcfg{len(case)}"
    path = write_config(tmp_path, provider, nats_server.url, softhsm_token)
    path.write_text(edit(path.read_text()))
    proc = CryptoProcess(path, softhsm_token, tmp_path / "stderr").start(wait=False)
    try:
        assert proc.wait() == 2
        err = proc.stderr()
        assert str(path) in err and field in err, err
        assert not has_event(err, "service_started")
        with pytest.raises(Unavailable):
            await client.ping(provider)
    finally:
        proc.stop()
