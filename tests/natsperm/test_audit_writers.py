"""An audit nobody can forge or flood (issue 11, item 4), against a real nats-server with
the stack's permission tables and the audit stream made by the supervisor's setup.

Each writer may publish only on kms.audit.<itself>, chains only its own entries, and has
a quota of messages in the stream: a flood of junk from one writer (here the CA's
identity) neither stalls another writer's appends nor grows beyond its quota, and
`verify` reports it as one problem and a count. An entry claiming another writer fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import nats.errors
import nats.js.errors
import pytest

from edgekms.audit import (
    STREAM,
    STREAM_FULL,
    AuditWriter,
    ChainReport,
    ChainVerifier,
    build_entry,
    canonical,
    stream_config,
)
from edgekms.errors import ResourceExhausted
from tests.natsperm.conftest import SecureBus, connect, connected, end_ceremony, start_secure_bus

pytestmark = pytest.mark.timeout(120)

QUOTA = 300  # messages per writer subject in this test's stream
FLOOD = 1000


@pytest.fixture
def audit_bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBus]:
    bus = start_secure_bus(tmp_path_factory.mktemp("auditbus"), setup=True)
    try:

        async def set_up() -> None:
            conn = await connect(bus, "kmsctl")
            try:
                await conn.nc.jetstream(timeout=10).add_stream(
                    stream_config(max_bytes=64 * 1024 * 1024, writer_quota=QUOTA)
                )
            finally:
                await conn.nc.close()

        asyncio.run(set_up())
        end_ceremony(bus)
        yield bus
    finally:
        bus.server.stop()


async def verify(bus: SecureBus) -> ChainReport:
    """What `kmsctl audit verify` does with TailAudit's records, read here directly."""
    async with connected(bus, "broker") as broker:
        js = broker.nc.jetstream(timeout=10)
        info = await js.stream_info(STREAM)
        verifier = ChainVerifier()
        for seq in range(1, info.state.last_seq + 1):
            msg = await js.get_msg(STREAM, seq=seq, direct=True)
            verifier.feed(seq, msg.data or b"", msg.subject or "")
        return verifier.finish(info.state.last_seq)


async def test_a_junk_flood_neither_stalls_the_broker_nor_outgrows_its_quota(
    audit_bus: SecureBus,
) -> None:
    async with connected(audit_bus, "broker") as broker, connected(audit_bus, "ca") as ca:
        writer = AuditWriter(broker.nc.jetstream(timeout=10), "broker")

        async def flood() -> int:
            refused = 0
            js = ca.nc.jetstream(timeout=10)
            acks = [js.publish("kms.audit.ca", b"junk %d" % i) for i in range(FLOOD)]
            for outcome in await asyncio.gather(*acks, return_exceptions=True):
                if isinstance(outcome, nats.js.errors.APIError):
                    assert outcome.err_code == STREAM_FULL
                    refused += 1
            return refused

        async def decisions() -> list[int]:
            done = []
            for i in range(40):
                appended = await writer.append("Sign", "ok", client="alice", target=f"k{i}")
                done.append(appended.seq)
            return done

        refused, seqs = await asyncio.gather(flood(), decisions())
        # Every decision was stored, each in its own place, whatever the flood did.
        assert len(set(seqs)) == 40
        # The flood is bounded by the CA's quota, and what is beyond it is refused.
        assert refused == FLOOD - QUOTA
        info = await broker.nc.jetstream(timeout=10).stream_info(STREAM, subjects_filter=">")
        assert info.state.subjects is not None
        assert info.state.subjects["kms.audit.ca"] == QUOTA
    report = await verify(audit_bus)
    assert report.problem_count == QUOTA  # each junk message, counted...
    assert len(report.problems) < QUOTA  # ...but listed only from the first few
    assert report.problems[0].kind == "malformed"
    assert all(p.kind == "malformed" for p in report.problems)
    assert writer._head is not None
    assert report.heads["broker"] == writer._head[1].hex()


async def test_a_full_writer_gets_a_typed_error_and_others_go_on(audit_bus: SecureBus) -> None:
    async with connected(audit_bus, "broker") as broker, connected(audit_bus, "ca") as ca:
        ca_writer = AuditWriter(ca.nc.jetstream(timeout=10), "ca")
        for i in range(QUOTA):
            await ca_writer.append("ca.issue", "ok", target=f"serial{i}")
        with pytest.raises(ResourceExhausted) as info:
            await ca_writer.append("ca.issue", "ok", target="one too many")
        assert info.value.reason == "audit.full"
        appended = await AuditWriter(broker.nc.jetstream(timeout=10), "broker").append("Sign", "ok")
        assert appended.seq == QUOTA + 1
    assert (await verify(audit_bus)).ok


async def test_an_entry_claiming_the_broker_fails_verify(audit_bus: SecureBus) -> None:
    async with connected(audit_bus, "broker") as broker, connected(audit_bus, "ca") as ca:
        await AuditWriter(broker.nc.jetstream(timeout=10), "broker").append("Sign", "ok")
        ca_writer = AuditWriter(ca.nc.jetstream(timeout=10), "ca")
        await ca_writer.append("ca.issue", "ok")
        # Publishing as the broker is refused outright ...
        js = ca.nc.jetstream(timeout=0.5)
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await js.publish("kms.audit.broker", b"{}")
        await ca.violation('publish to "kms.audit.broker"')
        # ... so the forger chains a broker-looking entry on its own subject.
        seq, prev = await ca_writer.read_head()
        forged = build_entry(
            writer="broker",
            action="ClientService/AddClient",
            outcome="ok",
            client="admin",
            role="admin",
            target="mallory",
            prev_hash=prev,
        )
        await ca.nc.jetstream(timeout=10).publish(
            "kms.audit.ca",
            canonical(forged),
            headers={"Nats-Expected-Last-Subject-Sequence": str(seq)},
        )
    report = await verify(audit_bus)
    assert [(p.seq, p.kind) for p in report.problems] == [(3, "writer_mismatch")]
