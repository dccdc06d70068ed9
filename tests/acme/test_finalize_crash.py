"""The CA killed (SIGKILL) in the middle of an ACME finalize: the order was accepted
(`processing`, its CSR stored) and the token had not signed yet. After a restart the
client's next look at the order completes it: the certificate is issued once, under
the order's own request id, and the order is valid. Never a consumed order without a
certificate."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bench.acmeclient import AcmeClient, b64, csr_for
from edgekms.subjects import CA_BUCKET, ca_subject
from edgekms.v1 import ca_pb2
from edgekms.v1 import common_pb2 as pb
from mgmt.natsserver import NatsServer, free_port
from tests.acme.conftest import Webroot
from tests.conftest import SLOWDOWN
from tests.crypto.conftest import CryptoProcess
from tests.logevents import has_event


class CAProcess:
    """`python -m ca_service` (what `kmsctl ca serve` execs) with an [acme] table."""

    def __init__(self, directory: Path, nats_url: str, webroot: Webroot) -> None:
        self.acme_port = free_port()
        self.config = directory / "ca.toml"
        self.config.write_text(
            f'nats_url = "{nats_url}"\nhttp_listen = "127.0.0.1:{free_port()}"\n'
            f'[acme]\nlisten = "127.0.0.1:{self.acme_port}"\nnames = ["127.0.0.1"]\n'
            f"http01_port = {webroot.port}\n"
            '[acme.hosts]\n"nas.home.arpa" = "127.0.0.1"\n'
        )
        self.log = directory / "ca.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ca_service", "--config", str(self.config)],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def wait_for(self, event: str, after: int = 0, deadline: float = 90.0) -> None:
        end = time.monotonic() + deadline * SLOWDOWN
        while not has_event(self.log.read_text(errors="replace")[after:], event):
            assert self.proc is not None and self.proc.poll() is None, self.tail()
            assert time.monotonic() < end, f"no {event}: {self.tail()}"
            time.sleep(0.1)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture
def ca_process(tmp_path: Path, ca_nats: NatsServer, webroot: Webroot) -> Iterator[CAProcess]:
    proc = CAProcess(tmp_path, ca_nats.url, webroot)
    try:
        yield proc
    finally:
        proc.kill()


async def order_state(nc: nats.aio.client.Client, order_id: str) -> str:
    kv = await nc.jetstream().key_value(CA_BUCKET)
    return str(json.loads((await kv.get(f"acme.order.{order_id}")).value or b"{}")["status"])


async def test_a_finalize_killed_mid_way_is_completed_after_restart(
    ca_process: CAProcess,
    ca_nats: NatsServer,
    ca_crypto: CryptoProcess,
    webroot: Webroot,
    tmp_path: Path,
) -> None:
    ca_process.start()
    ca_process.wait_for("ca_service_started")
    nc = await nats.connect(ca_nats.url)
    try:
        reply = await nc.request(
            ca_subject("Init"),
            ca_pb2.InitCARequest(
                provider="hsm0", key_type=pb.KEY_TYPE_EC_P256, common_name="Crash CA"
            ).SerializeToString(),
            timeout=120,
        )
        init = ca_pb2.InitCAResponse.FromString(reply.data)
        root = tmp_path / "root.pem"
        root.write_bytes(
            x509.load_der_x509_certificate(init.root_certificate_der).public_bytes(
                serialization.Encoding.PEM
            )
        )
        ca_process.wait_for("acme_listening")
        directory = f"https://127.0.0.1:{ca_process.acme_port}/acme/directory"
        client = AcmeClient(directory, str(root))
        await asyncio.to_thread(client.register)
        order_url, order = await asyncio.to_thread(client.new_order, ["nas.home.arpa"])
        order_id = order_url.rsplit("/", 1)[1]
        for chall in await asyncio.to_thread(client.challenges, order):
            webroot.answer(chall["token"], client.key_authorization(chall["token"]))
            await asyncio.to_thread(client.post, chall["url"], {})
        ready = await asyncio.to_thread(client.poll, order_url, ("ready", "invalid"))
        assert ready["status"] == "ready", ready

        # The token stops answering: the finalize is accepted and then waits to sign.
        assert ca_crypto.process is not None
        os.kill(ca_crypto.process.pid, signal.SIGSTOP)
        try:
            csr, _ = csr_for(["nas.home.arpa"])
            finalize = asyncio.create_task(
                asyncio.to_thread(client.post_raw, order["finalize"], {"csr": b64(csr)})
            )
            end = time.monotonic() + 60 * SLOWDOWN
            while await order_state(nc, order_id) != "processing":
                assert time.monotonic() < end and not finalize.done(), "finalize never began"
                await asyncio.sleep(0.05)
            ca_process.kill()  # SIGKILL while the order is processing
            with contextlib.suppress(Exception):
                await finalize
        finally:
            os.kill(ca_crypto.process.pid, signal.SIGCONT)
        assert await order_state(nc, order_id) == "processing"

        offset = len(ca_process.log.read_text(errors="replace"))
        ca_process.start()
        ca_process.wait_for("acme_listening", after=offset)
        done = await asyncio.to_thread(client.poll, order_url, ("valid", "invalid"))
        assert done["status"] == "valid", done
        chain = (await asyncio.to_thread(client.get, done["certificate"])).body
        leaf = x509.load_pem_x509_certificates(chain)[0]
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["nas.home.arpa"]
        # Exactly one certificate for the account, and it is the one handed out.
        requester = "acme:" + client.kid.rsplit("/", 1)[1]
        listed = await nc.request(
            ca_subject("ListCertificates"),
            ca_pb2.ListCertificatesRequest(match="nas.home.arpa").SerializeToString(),
            timeout=60,
        )
        records = [
            r
            for r in ca_pb2.ListCertificatesResponse.FromString(listed.data).records
            if r.requester == requester
        ]
        assert [r.serial for r in records] == [f"{leaf.serial_number:X}"]
    finally:
        await nc.close()
