"""`python -m bench.audit_bytes`: how many bytes the audit log grows by per Sign and per
certificate (issue 21, "Cheaper records": the figure to size a board by). Part of
`make bench`; alone about a minute.

On a `kmsctl up` stack: the broker's audit stream (KMS_AUDIT_BROKER) is read before and
after 400 Signs one at a time, 400 Signs 16 in flight (group commit puts several entries
in one message), and 40 certificate issuances; the figure is the stream's stored bytes
(JetStream's own count: entries plus per-message overhead) divided by the operations.
Each operation writes one entry; an issuance through the broker writes the broker's
entry for IssueCertificate (the CA itself writes none). Then the whole stream is encoded
as the archiver writes segments (gzip), for the bytes per entry once archived. Results:
bench/results/audit_bytes.json and audit_bytes.md.

Entries are stored in format "3" (edgekms.audit, "Compact entries"). For the cut against
the long format "2" that writers stored before, every message of the same stream is also
re-encoded in the long form (the same entries, both hashes in hex, the link in every
batch item) with the subject form of the compare-and-set header, and the difference in
bytes added to JetStream's count ("as format 2"): JetStream's per-message overhead does
not depend on the payload, so this is what the stream would hold. The figure measured on
the old code: docs/performance.md, "Audit bytes per operation".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import stackrun

log = logging.getLogger("bench.audit_bytes")

SIGNS = 400
ISSUES = 40


async def _usage(stack: stackrun.RunningStack) -> tuple[int, int]:
    """(bytes, messages) of the broker's audit stream, read with the broker's identity."""
    import nats

    from edgekms.audit import writer_stream

    nc = await nats.connect(stack.nats_url, **stackrun.bus_options(stack.data_dir, "broker"))
    try:
        info = await nc.jetstream(timeout=10).stream_info(writer_stream("broker"))
        return int(info.state.bytes or 0), int(info.state.messages or 0)
    finally:
        await nc.close()


async def _archived(stack: stackrun.RunningStack) -> dict[str, float]:
    """Bytes per entry once archived: every message of the broker's stream encoded as
    the archiver writes a segment (edgekms.retention.encode_line, gzip level 9), in
    segments of the archiver's default size, against JetStream's own count."""
    import gzip

    import nats

    from edgekms.audit import (
        canonical,
        parse_message,
        split_message,
        writer_stream,
    )
    from edgekms.retention import DEFAULT_SEGMENT_BYTES, encode_line

    nc = await nats.connect(stack.nats_url, **stackrun.bus_options(stack.data_dir, "broker"))
    try:
        js = nc.jetstream(timeout=10)
        stream = writer_stream("broker")
        info = await js.stream_info(stream)
        started = time.perf_counter()
        segments: list[bytes] = []
        lines: list[bytes] = []
        size = entries = 0
        long_extra = compact = 0  # bytes the long form would add; entries stored compact
        for seq in range(int(info.state.first_seq), int(info.state.last_seq) + 1):
            msg = await js.get_msg(stream, seq=seq, direct=True)
            raw = msg.data or b""
            line = encode_line(seq, msg.subject or "", raw)
            parsed = parse_message(raw)
            entries += len(parsed)
            compact += sum(1 for e in parsed if e["v"] == "3")
            long = [{**e, "v": "2"} for e in parsed]
            as_long = (
                canonical(long[0]) if split_message(raw) is None else canonical({"batch": long})
            )
            long_extra += len(as_long) - len(raw)
            if lines and size + len(line) > DEFAULT_SEGMENT_BYTES:
                segments.append(gzip.compress(b"".join(lines), compresslevel=9, mtime=0))
                lines, size = [], 0
            lines.append(line)
            size += len(line)
        if lines:
            segments.append(gzip.compress(b"".join(lines), compresslevel=9, mtime=0))
        archived = sum(map(len, segments))
        elapsed = time.perf_counter() - started
        return {
            # Read one by one (direct get) and compressed, as a lower bound of what the
            # archiver (an ordered consumer) keeps up with.
            "entries_per_s": round(entries / elapsed),
            "entries": entries,
            "stream_bytes_per_entry": round(int(info.state.bytes or 0) / entries, 1),
            "compact_entries": compact,
            "format2_stream_bytes_per_entry": round(
                (int(info.state.bytes or 0) + long_extra) / entries, 1
            ),
            "archive_bytes_per_entry": round(archived / entries, 1),
            "jsonl_bytes_per_entry": round(
                sum(len(gzip.decompress(s)) for s in segments) / entries, 1
            ),
        }
    finally:
        await nc.close()


def _measure(stack: stackrun.RunningStack, count: int, action: Any) -> dict[str, float]:
    """Bytes and messages of the broker's stream per operation over `count` of them.
    The measuring reads' own entries (none: stream info is not an RPC) do not count."""
    bytes_before, msgs_before = asyncio.run(_usage(stack))
    action()
    bytes_after, msgs_after = asyncio.run(_usage(stack))
    return {
        "operations": count,
        "bytes_per_op": round((bytes_after - bytes_before) / count, 1),
        "messages_per_op": round((msgs_after - msgs_before) / count, 3),
    }


def run(stack: stackrun.RunningStack) -> dict[str, Any]:
    from bench.issuance import _init_ca, make_csrs
    from mgmt.client import KMSClient

    _init_ca(stack.client_config)
    csrs = make_csrs(ISSUES)
    with KMSClient.from_config(stack.client_config, timeout=60) as kms:
        kms.create_key("bench/audit-bytes", "ec-p256", provider="hsm0")

        def sequential() -> None:
            for i in range(SIGNS):
                kms.sign("bench/audit-bytes", b"m%d" % i)

        def concurrent() -> None:
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda i: kms.sign("bench/audit-bytes", b"c%d" % i), range(SIGNS)))

        def issue() -> None:
            for csr in csrs:
                kms.issue_certificate("https-server", csr)

        result = {
            "sign_1_in_flight": _measure(stack, SIGNS, sequential),
            "sign_16_in_flight": _measure(stack, SIGNS, concurrent),
            "certificate": _measure(stack, ISSUES, issue),
        }
        result["archived"] = asyncio.run(_archived(stack))
    log.warning("audit bytes: %s", result)
    return result


def run_fresh(work: Path) -> dict[str, Any]:
    data = work / "data"
    data.parent.mkdir(parents=True, exist_ok=True)
    stack = stackrun.start(data)
    try:
        return run(stack)
    finally:
        stack.stop()


def write(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit_bytes.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    rows = [
        ("Sign, 1 in flight", result["sign_1_in_flight"]),
        ("Sign, 16 in flight (group commit)", result["sign_16_in_flight"]),
        ("certificate issued through the broker", result["certificate"]),
    ]
    lines = [
        "# Audit bytes per operation",
        "",
        "The broker's audit stream (KMS_AUDIT_BROKER), bytes as JetStream stores them; "
        'entries in the compact format "3" (edgekms.audit, "Compact entries").',
        "",
        "| operation | operations | bytes each | messages each |",
        "|---|---:|---:|---:|",
        *(
            f"| {name} | {r['operations']} | {r['bytes_per_op']} | {r['messages_per_op']} |"
            for name, r in rows
        ),
        "",
    ]
    archived = result.get("archived")
    if archived:
        lines += [
            "Once archived (issue 21: gzip JSON Lines segments of up to 1 MiB, as the "
            "broker's archiver writes them), per entry of the same stream:",
            "",
            "| entries | in the stream | as format 2 (computed) | segment line, uncompressed "
            "| in the archive (gzip) | entries read and compressed per second |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {archived['entries']} | {archived['stream_bytes_per_entry']} "
            f"| {archived.get('format2_stream_bytes_per_entry', '-')} "
            f"| {archived['jsonl_bytes_per_entry']} | {archived['archive_bytes_per_entry']} "
            f"| {archived.get('entries_per_s', '-')} |",
            "",
        ]
    (out / "audit_bytes.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.audit_bytes", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    work = Path(tempfile.mkdtemp(prefix="edgekms-audit-bytes-"))
    try:
        result = run_fresh(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write(result, args.out)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
