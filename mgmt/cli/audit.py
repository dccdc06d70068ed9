"""`kmsctl audit ...`: read the audit log and prove it whole.

The broker only hands out the stored bytes; the chain is checked here, in kmsctl, with
edgekms.audit's verifier, so a verdict does not rest on the server's word. `verify`
exits 0 when the chain is whole and 1 (FAILURE) naming the first broken entry when not.
json output is one object a line (JSON Lines) for `tail`, so `-f` and scripts read it
the same way, and one object for `verify`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from edgekms.audit import (
    LEGACY_STREAM,
    STREAM_PREFIX,
    ChainVerifier,
    check_entry,
    parse_entry,
    split_message,
)
from edgekms.v1 import audit_pb2
from mgmt.cli.client_access import client_options, open_client
from mgmt.cli.common import ExitCode, output_option
from mgmt.cli.output import table

if TYPE_CHECKING:
    from edgekms.client import KMSClient


@click.group("audit")
def audit_group() -> None:
    """Read the hash-chained audit log and verify it.

    \b
      kmsctl audit tail                  every entry so far, every writer
      kmsctl audit tail --writer ca      the CA's entries only
      kmsctl audit tail -f --from 120    the broker's from entry 120 on, then follow
      kmsctl audit verify                exit 0 if every writer's chain is whole
      kmsctl audit verify --archive DIR  ... and every archived segment in DIR
      kmsctl audit verify --device a1    on a fleet hub: device a1's copy there

    Each writer (broker, ca, crypto-<id>) has a stream of its own, numbered from 1;
    WRITER names the stream a line comes from and SEQ is the number in that stream
    (`legacy`: the shared stream an older version wrote, closed now). Older entries
    leave a stream only archived: gzip segments with checkpoints signed in the token,
    in the broker's DATA_DIR/audit-archive (docs/security.md, "Retention").
    """


def record_to_dicts(record: audit_pb2.AuditRecord) -> list[dict[str, Any]]:
    """The stable json shape of each entry in a stored message: its sequence, its index
    within the message (0 for a lone entry; a group-committed batch holds several) and
    the entry in its long form (a compact format 3 entry expanded, edgekms.audit), or
    None with the raw text when it is no entry."""
    items = split_message(record.raw)
    if items is None:
        try:
            entry: dict[str, Any] | None = parse_entry(record.raw)
        except ValueError:
            entry = None
        result: dict[str, Any] = {
            "stream": record.stream,
            "seq": record.seq,
            "index": 0,
            "entry": entry,
        }
        if entry is None:
            result["raw"] = record.raw.decode("utf-8", errors="replace")
        return [result]
    out = []
    for index, item in enumerate(items):
        try:
            out.append(
                {
                    "stream": record.stream,
                    "seq": record.seq,
                    "index": index,
                    "entry": check_entry(item),
                }
            )
        except ValueError:
            raw = json.dumps(item, sort_keys=True)
            out.append(
                {
                    "stream": record.stream,
                    "seq": record.seq,
                    "index": index,
                    "entry": None,
                    "raw": raw,
                }
            )
    return out


def stream_writer(stream: str) -> str:
    """The writer a stream belongs to, as `--writer` spells it (KMS_AUDIT_CRYPTO-HSM0 is
    crypto-hsm0): sequence numbers restart in each writer's stream, so a SEQ means
    nothing without it. The closed shared stream of older versions is `legacy`; a name
    that is neither is shown as it is, never guessed from the entry (whose `writer`
    field is the writer's own claim, checked only by `verify`)."""
    if stream == LEGACY_STREAM:
        return "legacy"
    if stream.startswith(STREAM_PREFIX) and len(stream) > len(STREAM_PREFIX):
        return stream[len(STREAM_PREFIX) :].lower()
    return stream or "-"


def _row(data: dict[str, Any]) -> list[str]:
    where = str(data["seq"]) if data["index"] == 0 else f"{data['seq']}#{data['index']}"
    writer = stream_writer(str(data.get("stream", "")))
    entry = data["entry"]
    if entry is None:
        return [writer, where, "-", "-", "-", "-", "(not an audit entry)"]
    actor = entry["actor"]
    who = f"{actor.get('client', '')}/{actor.get('role', '')}".strip("/") or "-"
    return [
        writer,
        where,
        str(entry["time"]),
        who,
        str(entry["action"]),
        str(entry["target"]) or "-",
        str(entry["outcome"]),
    ]


_HEADERS = ["WRITER", "SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "OUTCOME"]


@audit_group.command("tail")
@client_options
@click.option("-f", "--follow", is_flag=True, help="Keep printing new entries as they come.")
@click.option(
    "--from", "from_seq", type=click.IntRange(min=1), default=None,
    help="First sequence number to print.  [default: 1, or the newest COUNT with -n]",
)  # fmt: skip
@click.option(
    "-n", "--count", type=click.IntRange(min=1), default=None,
    help="The newest COUNT entries of one stream (--writer's, else the broker's), as "
    "tail(1) does (then follow, with -f); with --from, COUNT entries from there and stop.",
)  # fmt: skip
@click.option(
    "--writer", default="", metavar="NAME",
    help="Only this writer's stream (broker, ca, crypto-<id>); -f follows the broker's "
    "unless given.",
)  # fmt: skip
@output_option
def tail(
    data_dir: Path,
    config_path: Path | None,
    follow: bool,
    from_seq: int | None,
    count: int | None,
    writer: str,
    output: str,
) -> None:
    """Print audit entries in order, oldest first, one line each (a batch message's
    entries are shown as SEQ#INDEX after its first), stream by stream.

    \b
      kmsctl audit tail -n 4          the broker's newest four entries
      kmsctl audit tail --from 100 -n 10
      kmsctl audit tail -f -o json    everything, then the broker's new entries as they come
    """
    printed = 0
    newest = count is not None and from_seq is None
    with open_client(data_dir, config_path) as kms:
        if newest:
            assert count is not None
            # One stream's newest entries: the writer's, or the broker's as -f follows.
            writer = writer or "broker"
            # Each message holds at least one entry: the last COUNT messages hold the
            # newest COUNT entries (this read is itself audited, and shows among them).
            from_seq = max(1, _last_seq(kms, writer) - count + 1)
        stream = kms.tail_audit(from_seq or 1, follow=follow, writer=writer)
        try:
            if not follow:
                rows = [
                    data
                    for item in stream
                    if item.HasField("record")
                    for data in record_to_dicts(item.record)
                ]
                if count is not None:
                    rows = rows[-count:] if newest else rows[:count]
                if output == "json":
                    for data in rows:
                        click.echo(json.dumps(data, sort_keys=True))
                elif rows:
                    click.echo(table(_HEADERS, [_row(d) for d in rows]))
                return
            if output == "text":
                click.echo("  ".join(_HEADERS))
            limit = None if newest else count
            for item in stream:
                if not item.HasField("record"):
                    continue
                for data in record_to_dicts(item.record):
                    if output == "json":
                        click.echo(json.dumps(data, sort_keys=True))
                    else:
                        click.echo("  ".join(_row(data)))
                    sys.stdout.flush()
                    printed += 1
                    if limit is not None and printed >= limit:
                        break
                if limit is not None and printed >= limit:
                    break
        except KeyboardInterrupt:
            pass
        finally:
            stream.close()


def _last_seq(kms: KMSClient, writer: str) -> int:
    """A writer's audit stream's last sequence number (a tail from past its end: state
    only)."""
    for item in kms.tail_audit(2**63 - 1, writer=writer):
        if item.HasField("state"):
            return int(item.state.last_seq)
    return 0


@audit_group.command("verify")
@client_options
@click.option(
    "--archive",
    "archive_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    metavar="DIR",
    help="Also prove the archived segments in DIR (the broker's DATA_DIR/audit-archive, "
    "or a copy shipped away): every writer's chain from entry 1, through every segment "
    "and its signed checkpoint, into what the streams still hold.",
)
@click.option(
    "--device",
    default="",
    metavar="ID",
    help="On a fleet hub: verify the hub's copy of device ID's audit instead "
    '(docs/cluster.md, "Fleet"): every writer\'s chain, and that each entry was '
    "sourced from the device, whole and in order.",
)
@output_option
def verify(
    data_dir: Path, config_path: Path | None, archive_dir: Path | None, device: str, output: str
) -> None:
    """Walk every writer's chain; report the first broken link and a count.

    Reads every audit stream: the legacy shared one of older versions first, then each
    writer's own, carrying each writer's chain from one into the other. A stream whose
    oldest entries were archived (retention) is proven from its newest checkpoint: the
    chain head the archiver signed in the token before removing them, checked against
    the internal CA's key in the client's CA file. With --archive DIR the archived
    segments are proven too, end to end.

    \b
      kmsctl audit verify                          the window, from each checkpoint
      kmsctl audit verify --archive ./kms/audit-archive

    Catches a deleted entry (a missing sequence number), an altered one (its hash does
    not match), entries reordered or inserted (an entry that does not link to its
    writer's one before), an entry claiming another writer than the bus identity that
    stored it (writer_mismatch), a forged or unsigned checkpoint (checkpoint_invalid,
    checkpoint_missing), an altered segment (archive_tampered) and a missing one
    (segment_missing). Prints the first problem and how many there are, not a line each
    (-o json lists the first few). Prints each writer's head hash: keep them somewhere
    else, and a later run proves that nothing up to them was rewritten.
    """
    from edgekms.clientconfig import load_client_config
    from edgekms.retention import StreamProof, trusted_keys
    from mgmt.cli.client_access import resolve_config

    if device:
        if archive_dir is not None:
            raise click.BadParameter("not with --archive", param_hint="--device")
        _verify_device(data_dir, config_path, device, output)
        return
    if archive_dir is not None and not archive_dir.is_dir():
        raise click.BadParameter(f"{archive_dir} is not a directory", param_hint="--archive")
    config = load_client_config(config_path or resolve_config(data_dir))
    verifier = ChainVerifier()
    proof = StreamProof(verifier, trusted_keys(config.ca_cert.read_bytes()), archive_dir)
    last_seq: int | None = None
    with open_client(data_dir, config_path) as kms:
        for item in kms.tail_audit(1):
            if item.HasField("state"):
                if last_seq is not None:
                    proof.end(last_seq)
                state = item.state
                if state.stream == LEGACY_STREAM:
                    verifier.begin_stream(state.stream)
                else:
                    proof.begin(
                        state.stream,
                        state.first_seq,
                        state.last_seq,
                        state.messages,
                        state.checkpoint,
                    )
                last_seq = state.last_seq
            else:
                proof.feed(item.record.seq, item.record.raw, item.record.subject)
    if last_seq is not None:
        proof.end(last_seq)
    report = verifier.finish()
    if output == "json":
        data = report.to_dict()
        data["archived_segments"] = proof.segments
        data["checkpoints"] = dict(sorted(proof.checkpoints.items()))
        click.echo(json.dumps(data, indent=2))
    elif report.ok:
        archived = f", {proof.segments} archived segment(s)" if archive_dir is not None else ""
        click.echo(
            f"audit chain whole: {report.entries} entries in {report.messages} messages "
            f"in {len(report.streams)} stream(s){archived}"
        )
        for writer, head in sorted(report.heads.items()):
            click.echo(f"  {writer}: head {head}")
        for stream, seq in sorted(proof.checkpoints.items()):
            click.echo(f"  {stream}: checkpoint at {seq}")
    else:
        first = report.problems[0]
        click.echo(f"audit chain broken at entry {first.where}: {first.message}")
        click.echo(
            f"{report.problem_count} problem(s) in {report.entries} entries "
            f"({report.messages} messages in {len(report.streams)} stream(s))"
        )
    if not report.ok:
        sys.exit(int(ExitCode.FAILURE))


def _verify_device(data_dir: Path, config_path: Path | None, device: str, output: str) -> None:
    """`verify --device`: the hub's copy of one device's audit, walked here with
    edgekms.fleet's verifier (chains and origins), as the broker hands it out."""
    from edgekms.fleet import FleetVerifier

    verifier = FleetVerifier(device)  # InvalidArgument fleet.device_invalid first
    last_seq = 0
    with open_client(data_dir, config_path) as kms:
        for item in kms.tail_audit(1, device=device):
            if item.HasField("state"):
                last_seq = item.state.last_seq
            else:
                record = item.record
                verifier.feed(record.seq, record.raw, record.subject, record.source or None)
    report = verifier.finish(last_seq)
    if output == "json":
        data = report.to_dict()
        data["device"] = device
        click.echo(json.dumps(data, indent=2))
    elif report.ok:
        click.echo(
            f"device {device}: audit chain whole at the hub: {report.entries} entries "
            f"in {report.messages} messages"
        )
        for writer, head in sorted(report.heads.items()):
            click.echo(f"  {writer}: head {head}")
    else:
        first = report.problems[0]
        click.echo(f"device {device}: audit chain broken at entry {first.where}: {first.message}")
        click.echo(f"{report.problem_count} problem(s) in {report.entries} entries")
    if not report.ok:
        sys.exit(int(ExitCode.FAILURE))


def register(cli: click.Group) -> None:
    cli.add_command(audit_group)


__all__ = ["audit_group", "record_to_dicts", "register"]
