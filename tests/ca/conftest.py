"""Real parts for the CA service tests: the module's own nats-server (JetStream), a real
`kms-crypto` on the session's SoftHSM token, and per test a CA service (NATS + HTTP) on
its own KV bucket and a free loopback port."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import nats
import nats.aio.client
import pytest
from google.protobuf.message import Message

from ca_service.authority import CertificateAuthority
from ca_service.builder import CaUrls
from ca_service.http import start_http
from ca_service.service import add_ca_service
from ca_service.signer import KMSKeyBackend
from ca_service.store import CAStore
from edgekms.crypto_client import CryptoClient
from edgekms.errors import from_bytes
from edgekms.subjects import ca_subject
from edgekms.v1 import ca_pb2
from edgekms.v1 import common_pb2 as pb
from mgmt.natsserver import NatsServer, free_port
from tests.conftest import TokenInfo, start_nats
from tests.crypto.conftest import CryptoProcess, write_config

PROVIDER = "hsm0"
R = TypeVar("R", bound=Message)


@pytest.fixture(scope="module")
def ca_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = start_nats(tmp_path_factory.mktemp("ca-nats"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ca_crypto(
    tmp_path_factory: pytest.TempPathFactory, ca_nats: NatsServer, softhsm_token: TokenInfo
) -> Iterator[CryptoProcess]:
    directory = tmp_path_factory.mktemp("ca-hsm0")
    config = write_config(directory, PROVIDER, ca_nats.url, softhsm_token, sessions=8)
    proc = CryptoProcess(config, softhsm_token, directory / "stderr").start()
    yield proc
    assert proc.stop() == 0, proc.stderr()[-2000:]


@dataclass
class CAEnv:
    nc: nats.aio.client.Client
    ca: CertificateAuthority
    store: CAStore
    http_url: str
    bucket: str

    async def call(self, operation: str, request: Message, response_type: type[R]) -> R:
        """One request to kms.ca.<operation>, as the broker makes it; errors re-raised typed."""
        msg = await self.nc.request(ca_subject(operation), request.SerializeToString(), timeout=60)
        if msg.headers and "Nats-Service-Error-Code" in msg.headers:
            raise from_bytes(msg.data)
        response = response_type()
        response.ParseFromString(msg.data)
        return response

    async def init(self, key_type: int = pb.KEY_TYPE_EC_P256) -> ca_pb2.InitCAResponse:
        return await self.call(
            "Init",
            ca_pb2.InitCARequest(
                provider=PROVIDER,
                key_type=key_type,  # type: ignore[arg-type]
                common_name="EdgeKMS Test CA",
                organization="EdgeKMS Tests",
                disable_root=True,
            ),
            ca_pb2.InitCAResponse,
        )

    async def record_count(self) -> int:
        return len(await self.store.list_records())


@pytest.fixture
async def ca_env(ca_nats: NatsServer, ca_crypto: CryptoProcess) -> AsyncIterator[CAEnv]:
    import asyncio

    nc = await nats.connect(ca_nats.url, allow_reconnect=False)
    js = nc.jetstream()
    bucket = f"kms_ca_{secrets.token_hex(4)}"
    store = await CAStore.open(js, bucket)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    ca = CertificateAuthority(
        store,
        KMSKeyBackend(CryptoClient(nc, default_timeout=30.0), asyncio.get_running_loop()),
        urls=CaUrls.from_base(base),
    )
    service = await add_ca_service(nc, ca)
    runner = await start_http(ca, "127.0.0.1", port)
    yield CAEnv(nc, ca, store, base, bucket)
    await ca.crl_jobs.stop()
    await runner.cleanup()
    await service.stop()
    await js.delete_key_value(bucket)
    await nc.close()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
