"""Raw JetStream access to the audit stream, as an attacker with stream rights has it."""

from __future__ import annotations

import dataclasses

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from edgekms.audit import STREAM, ChainReport, ChainVerifier, stream_config


async def stored(js: JetStreamContext) -> list[tuple[int, bytes, str]]:
    """Every stored message: (sequence, bytes, subject), in order."""
    info = await js.stream_info(STREAM)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await js.get_msg(STREAM, seq=seq)
        except nats.js.errors.NotFoundError:
            continue
        out.append((seq, msg.data or b"", msg.subject or ""))
    return out


async def verify_stream(js: JetStreamContext) -> ChainReport:
    info = await js.stream_info(STREAM)
    verifier = ChainVerifier()
    for seq, raw, subject in await stored(js):
        verifier.feed(seq, raw, subject)
    return verifier.finish(info.state.last_seq)


def deletable_stream_config() -> StreamConfig:
    """The audit stream as an older version made it: messages can be deleted. Whoever
    may delete and re-create the stream can choose this, so the chain must still show
    every deletion."""
    return dataclasses.replace(stream_config(), deny_delete=False, deny_purge=False)


async def rewrite(js: JetStreamContext, messages: list[tuple[bytes, str]]) -> None:
    """Delete the stream and publish `messages` into a fresh one, sequences from 1:
    the only way the JetStream API lets anyone change or reorder what was stored."""
    await js.delete_stream(STREAM)
    await js.add_stream(deletable_stream_config())
    for raw, subject in messages:
        await js.publish(subject, raw, stream=STREAM)
