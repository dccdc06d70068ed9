"""An audit nobody can forge or flood (issue 11, item 4), against a real nats-server with
the stack's permission tables and the audit streams made by the supervisor's setup.

Each writer may publish only on kms.audit.<itself>, chains only its own entries, and has
a stream of its own with its own limits: a flood of junk from one writer (here the CA's
identity), by count or by bytes, fills its own stream only, never stalls another
writer's appends, and `verify` reports it as one problem and a count. An entry claiming
another writer fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import nats.errors
import nats.js.errors
import pytest

from edgekms.audit import (
    STREAM_FULL,
    AuditWriter,
    ChainReport,
    ChainVerifier,
    StreamUsage,
    audit_streams,
    build_entry,
    canonical,
    harden_stream,
    stored_form,
    writer_stream,
)
from edgekms.errors import ResourceExhausted
from mgmt.natsauth import audit_writers
from tests.natsperm.conftest import SecureBus, connect, connected, end_ceremony, start_secure_bus

pytestmark = pytest.mark.timeout(120)

QUOTA = 300  # messages in the CA's stream in this test
CA_BYTES = 512 * 1024  # the CA's stream's size in this test
FLOOD = 1000


@pytest.fixture
def audit_bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBus]:
    bus = start_secure_bus(tmp_path_factory.mktemp("auditbus"), setup=True)
    try:

        async def set_up() -> None:
            conn = await connect(bus, "kmsctl")
            try:
                await harden_stream(
                    conn.nc.jetstream(timeout=10),
                    audit_writers(bus.providers),
                    # The CA's stream small, the broker's as `kmsctl up` makes it.
                    limits={"ca": (CA_BYTES, QUOTA)},
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
        verifier = ChainVerifier()
        for stream in await audit_streams(js):
            info = await js.stream_info(stream)
            verifier.begin_stream(stream)
            for seq in range(1, info.state.last_seq + 1):
                msg = await js.get_msg(stream, seq=seq, direct=True)
                verifier.feed(seq, msg.data or b"", msg.subject or "")
            verifier.end_stream(info.state.last_seq)
        return verifier.finish()


async def usage(bus: SecureBus, writer: str) -> StreamUsage:
    async with connected(bus, "broker") as broker:
        info = await broker.nc.jetstream(timeout=10).stream_info(writer_stream(writer))
        return StreamUsage.of(info)


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
    ca_usage = await usage(audit_bus, "ca")
    assert ca_usage.messages == QUOTA and ca_usage.full
    assert not (await usage(audit_bus, "broker")).full
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
        assert appended.seq == 1  # in the broker's own stream
    assert (await verify(audit_bus)).ok


async def test_a_flood_that_fills_the_cas_bytes_leaves_the_broker_appending(
    audit_bus: SecureBus,
) -> None:
    """Issue 11, item 4's gap: one stream's total size shared by every writer let a
    flooder fill it for all. Now the CA's bus identity fills its own stream's bytes with
    big junk messages; the broker's decisions, during and after, are all stored, and
    the CA's own appends are the ones refused with audit.full."""
    junk = b"x" * (32 * 1024)
    async with connected(audit_bus, "broker") as broker, connected(audit_bus, "ca") as ca:
        writer = AuditWriter(broker.nc.jetstream(timeout=10), "broker")

        async def flood() -> int:
            """Big junk until refused, then smaller until even a tiny message is."""
            js = ca.nc.jetstream(timeout=10)
            refused = 0
            for size in (len(junk), 1024, 16):
                for i in range(CA_BYTES // size + 8):
                    try:
                        await js.publish("kms.audit.ca", junk[:size] + b"%d" % i)
                    except nats.js.errors.APIError as exc:
                        assert exc.err_code == STREAM_FULL, exc
                        refused += 1
                        break
            return refused

        async def decisions() -> list[int]:
            return [(await writer.append("Sign", "ok", target=f"b{i}")).seq for i in range(40)]

        refused, seqs = await asyncio.gather(flood(), decisions())
        assert refused == 3  # the CA's stream filled up and refused the rest ...
        assert seqs == list(range(1, 41))  # ... while every broker decision was stored
        with pytest.raises(ResourceExhausted) as info:
            await AuditWriter(ca.nc.jetstream(timeout=10), "ca").append("ca.issue", "ok")
        assert info.value.reason == "audit.full"
        assert "ca" in info.value.message
        after = await writer.append("Sign", "ok", target="after the flood")
        assert after.seq == 41
    ca_usage = await usage(audit_bus, "ca")
    assert ca_usage.full and ca_usage.bytes <= CA_BYTES
    report = await verify(audit_bus)
    assert report.heads["broker"] == after.entry["hash"]
    assert {p.stream for p in report.problems} == {writer_stream("ca")}  # junk, one count


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
            canonical(stored_form(forged)),
            headers={"Nats-Expected-Last-Subject-Sequence": str(seq)},
        )
    report = await verify(audit_bus)
    assert [(p.stream, p.seq, p.kind) for p in report.problems] == [
        (writer_stream("ca"), 2, "writer_mismatch")
    ]
