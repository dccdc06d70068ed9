"""Raw JetStream access to the audit streams, as an attacker with stream rights has it."""

from __future__ import annotations

import dataclasses

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from edgekms.audit import ChainReport, ChainVerifier, audit_streams, stream_config, writer_stream


async def only_stream(js: JetStreamContext) -> str:
    """The one audit stream of a test that has a single writer."""
    names = await audit_streams(js)
    assert len(names) == 1, names
    return names[0]


async def stored(js: JetStreamContext, stream: str | None = None) -> list[tuple[int, bytes, str]]:
    """Every stored message of `stream` (default: the only audit stream there is):
    (sequence, bytes, subject), in order."""
    stream = stream or await only_stream(js)
    info = await js.stream_info(stream)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await js.get_msg(stream, seq=seq)
        except nats.js.errors.NotFoundError:
            continue
        out.append((seq, msg.data or b"", msg.subject or ""))
    return out


async def verify_stream(js: JetStreamContext) -> ChainReport:
    """What `kmsctl audit verify` does: every audit stream, the legacy one first."""
    verifier = ChainVerifier()
    for stream in await audit_streams(js):
        info = await js.stream_info(stream)
        verifier.begin_stream(stream)
        for seq, raw, subject in await stored(js, stream):
            verifier.feed(seq, raw, subject)
        verifier.end_stream(info.state.last_seq)
    return verifier.finish()


def deletable_stream_config(writer: str = "test") -> StreamConfig:
    """A writer's stream as an older version made it: messages can be deleted. Whoever
    may delete and re-create the stream can choose this, so the chain must still show
    every deletion."""
    return dataclasses.replace(stream_config(writer), deny_delete=False, deny_purge=False)


async def rewrite(
    js: JetStreamContext, messages: list[tuple[bytes, str]], writer: str = "test"
) -> None:
    """Delete a writer's stream and publish `messages` into a fresh one, sequences from
    1: the only way the JetStream API lets anyone change or reorder what was stored."""
    stream = writer_stream(writer)
    await js.delete_stream(stream)
    await js.add_stream(deletable_stream_config(writer))
    for raw, subject in messages:
        await js.publish(subject, raw, stream=stream)
