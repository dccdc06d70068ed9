"""The fixtures themselves: the real nats-server has JetStream, the token takes its PIN."""

from __future__ import annotations

import nats
import pkcs11

from mgmt.natsserver import NatsServer
from tests.conftest import TokenInfo


async def test_nats_server_has_jetstream(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        info = await nc.jetstream().account_info()
        assert info.limits is not None
    finally:
        await nc.close()


def test_softhsm_token_logs_in_with_its_pin(softhsm_token: TokenInfo) -> None:
    lib = pkcs11.lib(softhsm_token.module)
    token = lib.get_token(token_label=softhsm_token.label)
    with token.open(user_pin=softhsm_token.pin) as session:
        assert session.token.label == "edgekms"
