"""kms-crypto as a process: exit codes and messages when it cannot start, clean stop and
restart, and replicas sharing one queue group."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from pathlib import Path
from typing import Any

import nats.aio.client
import pytest

from edgekms.crypto_client import CryptoClient
from edgekms.errors import Unavailable
from edgekms.v1 import common_pb2 as pb
from edgekms.v1 import crypto_pb2
from mgmt.natsserver import free_port
from tests.conftest import TokenInfo
from tests.crypto.conftest import CryptoFactory
from tests.logevents import has_event


def _sign_req(key_id: bytes, n: int = 0) -> crypto_pb2.SignRequest:
    return crypto_pb2.SignRequest(
        key_id=key_id,
        algorithm=pb.SIGNATURE_ALGORITHM_ECDSA_SHA256,
        data=hashlib.sha256(f"m{n}".encode()).digest(),
    )


async def test_wrong_pin_exits_3_and_never_registers(
    crypto_factory: CryptoFactory, client: CryptoClient, tmp_path: Path
) -> None:
    bad_pin = tmp_path / "bad.pin"
    bad_pin.write_text("not-the-pin\n")
    proc = crypto_factory("hsmbad", wait=False, pin_file=bad_pin)
    assert proc.wait() == 3
    err = proc.stderr()
    assert "kms-crypto: token 'edgekms': PIN incorrect" in err
    assert "not-the-pin" not in err
    assert not has_event(err, "service_started")
    with pytest.raises(Unavailable):
        await client.ping("hsmbad")


async def test_missing_token_exits_3(crypto_factory: CryptoFactory) -> None:
    proc = crypto_factory("hsmnone", wait=False, token_label="no-such-token")
    assert proc.wait() == 3
    assert "token 'no-such-token': not found in" in proc.stderr()


async def test_unreachable_nats_exits_4(crypto_factory: CryptoFactory) -> None:
    proc = crypto_factory("hsmnonats", wait=False, nats_url=f"nats://127.0.0.1:{free_port()}")
    assert proc.wait() == 4
    assert "kms-crypto: cannot reach NATS at nats://127.0.0.1:" in proc.stderr()


async def test_bad_config_exits_2(crypto_factory: CryptoFactory, tmp_path: Path) -> None:
    proc = crypto_factory("hsmcfg", wait=False, pin_file=tmp_path / "absent.pin")
    assert proc.wait() == 2
    assert "pkcs11.pin_file: cannot read" in proc.stderr()


async def test_stopped_service_is_unavailable_fast_then_restarts(
    crypto_factory: CryptoFactory, client: CryptoClient
) -> None:
    """A stopped service leaves no responders: NATS says so at once and the caller gets
    Unavailable provider.unavailable, however long its own timeout. Waiting out the
    timeout would be DeadlineExceeded provider.deadline, so the type proves "fast"
    without a stopwatch. After a restart, signing is polled for until it works."""
    proc = crypto_factory("hsmr")
    made = await client.generate_key(
        "hsmr",
        crypto_pb2.GenerateKeyRequest(
            key_id=secrets.token_bytes(16), label="restart", key_type=pb.KEY_TYPE_EC_P256
        ),
    )
    await client.sign("hsmr", _sign_req(made.key_id))
    assert proc.stop() == 0
    assert has_event(proc.stderr(), "service_stopped")
    with pytest.raises(Unavailable) as info:
        await client.sign("hsmr", _sign_req(made.key_id), timeout=120)
    assert info.value.reason == "provider.unavailable"
    proc.start()
    deadline = time.monotonic() + 60
    while True:
        try:
            signed = await client.sign("hsmr", _sign_req(made.key_id, 1), timeout=10)
            break
        except Unavailable as err:  # registered, but the bus may not route to it yet
            assert err.reason == "provider.unavailable"
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    assert signed.signature


async def _stats(
    nc: nats.aio.client.Client, service: str, replicas: int
) -> list[dict[str, object]]:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(f"$SRV.STATS.{service}", b"", reply=inbox)
    answers: list[dict[str, Any]] = []
    try:
        while len(answers) < replicas:
            msg = await sub.next_msg(timeout=3)
            answers.append(json.loads(msg.data))
    finally:
        await sub.unsubscribe()
    return answers


async def test_replicas_share_the_queue_group(
    crypto_factory: CryptoFactory, client: CryptoClient, nc: nats.aio.client.Client
) -> None:
    crypto_factory("hsmq")
    crypto_factory("hsmq")
    made = await client.generate_key(
        "hsmq",
        crypto_pb2.GenerateKeyRequest(
            key_id=secrets.token_bytes(16), label="replicas", key_type=pb.KEY_TYPE_EC_P256
        ),
    )
    n = 60
    results = await asyncio.gather(
        *(client.sign("hsmq", _sign_req(made.key_id, i)) for i in range(n))
    )
    assert all(r.signature for r in results)
    stats = await _stats(nc, "kms-crypto-hsmq", 2)
    per_replica = []
    for answer in stats:
        endpoints = answer["endpoints"]
        assert isinstance(endpoints, list)
        sign = next(e for e in endpoints if e["name"] == "Sign")
        assert sign["queue_group"] == "kms.crypto.hsmq"
        per_replica.append(int(sign["num_requests"]))
    assert sum(per_replica) == n  # each request answered exactly once
    assert all(count > 0 for count in per_replica), per_replica  # both did work


async def test_pin_from_environment(
    crypto_factory: CryptoFactory, softhsm_token: TokenInfo, client: CryptoClient
) -> None:
    """The PIN may come from an environment variable instead of a file."""
    proc = crypto_factory("hsmenv", env={"T_HSM_PIN": softhsm_token.pin}, pin_env="T_HSM_PIN")
    answer = await client.ping("hsmenv")
    assert answer["metadata"] == {"provider": "hsmenv", "kind": "pkcs11", "workers": "4"}
    assert softhsm_token.pin not in proc.stderr()
    assert proc.stop() == 0
