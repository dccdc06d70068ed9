"""The floor of the broker's shape: gRPC in, one bus round trip, an answer, nothing else.

`bench/floor.py` measures one grpc.aio process that answers Sign by itself. The design
does not allow a broker like that: the key is in a crypto service behind the bus, and
(issue 19) the audit record must be durable before the caller gets a signature. This
measures the cheapest process chain of that shape, with no EdgeKMS code in it:

- `relay`: a grpc.aio server (same grpc, mutual TLS, uvloop, Go client as the floor)
  whose handler sends the request bytes over NATS (TLS, like the stack's bus) to a
  responder process (nats-py on uvloop, like a crypto service) that answers with one
  precomputed, valid SignResponse. No authorisation, no token, no audit.
- `relay+audit`: the same, and beside the bus request the handler publishes a
  200-byte record to a JetStream file stream with `sync_interval: always` (the stack's
  nats-server setting) and waits for both acknowledgements before answering, as the
  broker does with a Sign's audit entry (`record_alongside`). No chain, no hash.

Each is measured at 1 and 64 in flight next to the floor of the same run. Whatever the
relay rows cannot reach, no broker of this shape in CPython reaches either; what EdgeKMS
loses against `relay+audit` is its own code (identity, policy, the chained entry, the
token). `python -m bench.relayfloor` writes `bench/results/relayfloor.md` and `.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import floor
from bench.stats import RunResult

SUBJECT = "floor.sign"
BATCH_SUBJECT = "floor.signbatch"
AUDIT_SUBJECT = "floor.audit.entries"
AUDIT_STREAM = "FLOOR_AUDIT"
RECORD = b"x" * 200  # about a compact Sign entry (bench/results/audit_bytes.md)


def _bus_tls(directory: Path) -> None:
    """A server certificate for 127.0.0.1 and its CA, for the bus's TLS."""
    tls = floor.mutual_tls("127.0.0.1")
    for name, blob in (("bus-ca.crt", tls.ca_cert), ("bus.crt", tls.server_cert),
                       ("bus.key", tls.server_key)):  # fmt: skip
        (directory / name).write_bytes(blob)
        (directory / name).chmod(0o600)


async def _connect(url: str, directory: Path) -> Any:
    import ssl

    import nats

    context = ssl.create_default_context(cafile=str(directory / "bus-ca.crt"))
    return await nats.connect(url, tls=context, max_reconnect_attempts=0)


async def _respond(url: str, directory: Path) -> None:
    from edgekms.v1 import common_pb2, keys_pb2

    answer = keys_pb2.SignResponse(
        signature=(directory / "signature").read_bytes(),
        algorithm=common_pb2.SIGNATURE_ALGORITHM_ECDSA_SHA256,
        key_name=floor.KEY_NAME,
    ).SerializeToString()
    nc = await _connect(url, directory)

    async def handle(msg: Any) -> None:
        await msg.respond(answer)

    async def handle_batch(msg: Any) -> None:
        await msg.respond(_frame([answer] * len(_unframe(msg.data))))

    await nc.subscribe(SUBJECT, cb=handle)
    await nc.subscribe(BATCH_SUBJECT, cb=handle_batch)
    await nc.flush()
    (directory / "responder.ready").touch()
    await asyncio.Event().wait()


def _frame(items: list[bytes]) -> bytes:
    return b"".join(len(item).to_bytes(4, "big") + item for item in items)


def _unframe(blob: bytes) -> list[bytes]:
    items, at = [], 0
    while at < len(blob):
        size = int.from_bytes(blob[at : at + 4], "big")
        items.append(blob[at + 4 : at + 4 + size])
        at += 4 + size
    return items


class _Rounds:
    """One round on the bus at a time; calls arriving meanwhile go out together next."""

    def __init__(self, nc: Any, js: Any) -> None:
        self.nc, self.js = nc, js
        self.waiting: list[tuple[bytes, asyncio.Future[bytes]]] = []
        self.busy = False

    async def sign(self, request: bytes) -> bytes:
        done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiting.append((request, done))
        if not self.busy:
            self.busy = True
            asyncio.get_running_loop().create_task(self._drain())
        return await done

    async def _drain(self) -> None:
        try:
            while self.waiting:
                batch, self.waiting = self.waiting, []
                try:
                    answer, _ = await asyncio.gather(
                        self.nc.request(BATCH_SUBJECT, _frame([r for r, _ in batch]), timeout=10),
                        self.js.publish(
                            AUDIT_SUBJECT, RECORD * len(batch), stream=AUDIT_STREAM, timeout=10
                        ),
                    )
                except Exception as exc:  # every waiting call fails with the round
                    for _, done in batch:
                        done.set_exception(exc)
                    continue
                for (_, done), item in zip(batch, _unframe(answer.data), strict=True):
                    done.set_result(item)
        finally:
            self.busy = False


async def _relay(port: int, url: str, directory: Path, mode: str) -> None:
    nc = await _connect(url, directory)
    js = nc.jetstream()
    rounds = _Rounds(nc, js)

    async def sign(request: bytes, context: Any) -> bytes:
        if mode == "batched+audit":
            return await rounds.sign(request)
        if mode == "relay":
            return bytes((await nc.request(SUBJECT, request, timeout=10)).data)
        answer, _ = await asyncio.gather(
            nc.request(SUBJECT, request, timeout=10),
            js.publish(AUDIT_SUBJECT, RECORD, stream=AUDIT_STREAM, timeout=10),
        )
        return bytes(answer.data)

    await floor.serve_sign(port, directory, sign)


async def _make_stream(url: str, directory: Path) -> None:
    from nats.js import api

    nc = await _connect(url, directory)
    try:
        await nc.jetstream().add_stream(
            api.StreamConfig(
                name=AUDIT_STREAM, subjects=[AUDIT_SUBJECT], storage=api.StorageType.FILE
            )
        )
    finally:
        await nc.close()


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.relayfloor", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run(
    work: Path, duration: float, warmup: float, inflights: tuple[int, ...] = (1, 64)
) -> list[RunResult]:
    """The floor and the three relays, each at every level of `inflights`."""
    from mgmt.natsserver import NatsServer, NatsServerConfig, free_port, wait_for_port

    results = floor.run(work, duration, warmup, inflights)
    directory = work / "relay"
    directory.mkdir(mode=0o700)
    files = floor._pki(directory)
    _bus_tls(directory)
    bus = NatsServer(
        NatsServerConfig(
            store_dir=directory / "js",
            port=free_port(),
            tls_cert=directory / "bus.crt",
            tls_key=directory / "bus.key",
        ),
        directory / "nats.conf",
        directory / "nats.log",
    ).start()
    url = f"tls://127.0.0.1:{bus.config.port}"
    try:
        asyncio.run(_make_stream(url, directory))
        assert bus.process is not None
        responder = _spawn("--respond", url, str(directory))
        try:
            deadline = time.monotonic() + 30
            while not (directory / "responder.ready").exists():
                if responder.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the relay floor's responder did not start")
                time.sleep(0.05)
            for mode in ("relay", "relay+audit", "batched+audit"):
                port = free_port()
                relay = _spawn("--relay", str(port), url, str(directory), mode)
                try:
                    wait_for_port("127.0.0.1", port, 15.0, relay)
                    time.sleep(0.3)
                    watch = {
                        "grpc relay": relay.pid,
                        "responder": responder.pid,
                        "nats-server": bus.process.pid,
                    }
                    for inflight in inflights:
                        results.append(
                            floor.measure(mode, port, files, inflight, duration, warmup, watch)
                        )
                finally:
                    relay.terminate()
                    relay.wait(10)
        finally:
            responder.terminate()
            responder.wait(10)
    finally:
        bus.stop()
    return results


def _cpu_us(result: RunResult) -> str:
    """CPU per call of each watched process (`cpu` holds seconds over the window)."""
    if not result.count:
        return "-"
    per_call = {k: v / result.count * 1e6 for k, v in result.cpu.items()}
    total = sum(per_call.values())
    parts = [f"{k} {v:.0f}" for k, v in sorted(per_call.items())]
    return ", ".join([*parts, f"total {total:.0f}"])


def report(results: list[RunResult], load: tuple[float, float]) -> str:
    by = {(r.path, r.inflight): r for r in results}
    lines = [
        "# The floor of the broker's shape (issue 19, item 2)",
        "",
        f"Produced by `python -m bench.relayfloor`; 2 CPUs, 1-min load average {load[0]:.1f} "
        f"at start, {load[1]:.1f} at end. Method: bench/relayfloor.py's docstring and "
        'docs/performance.md ("Unary Sign against its floor").',
        "",
        "| server | in flight | calls/s | p50 ms | p99 ms | share of the floor's rate "
        "| p50 over the floor's |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        base = by[("floor", r.inflight)]
        lines.append(
            f"| {r.path} | {r.inflight} | {r.rate:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} "
            f"| {r.rate / base.rate:.2f} | {r.p50_ms - base.p50_ms:+.2f} ms |"
        )
    lines += ["", "CPU per call by process (µs):", ""]
    for r in results:
        lines.append(f"- {r.path} at {r.inflight} in flight: {_cpu_us(r)}")
    return "\n".join([*lines, ""])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--respond":
        from edgekms import aio

        aio.run(_respond(sys.argv[2], Path(sys.argv[3])))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--relay":
        from edgekms import aio

        port, url, directory, mode = sys.argv[2:6]
        aio.run(_relay(int(port), url, Path(directory), mode))
        return
    parser = argparse.ArgumentParser(prog="python -m bench.relayfloor", description=__doc__)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--inflight", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="edgekms-relayfloor-") as tmp:
        results = run(Path(tmp), args.duration, args.warmup, tuple(args.inflight))
    after = os.getloadavg()[0]
    text = report(results, (before, after))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "relayfloor.md").write_text(text)
    (args.out / "relayfloor.json").write_text(
        json.dumps({"load": [before, after], "runs": [r.to_json() for r in results]}, indent=2)
        + "\n"
    )
    print(text)


if __name__ == "__main__":
    main()
