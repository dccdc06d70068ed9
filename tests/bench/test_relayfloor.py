"""The relay floor (bench/relayfloor.py) runs for real: a grpc.aio relay over mutual TLS,
a real nats-server with JetStream over TLS, a responder process, and the Go client, whose
sample responses must verify against the floor's key in every mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import relayfloor
from bench.load import go_available


def test_frames_round_trip_including_empty_items() -> None:
    items = [b"", b"a", bytes(range(256)) * 3]
    assert relayfloor._unframe(relayfloor._frame(items)) == items
    assert relayfloor._unframe(b"") == []


def test_every_relay_answers_verified_signatures_and_counts_each_process(
    tmp_path: Path,
) -> None:
    missing = go_available()
    if missing:
        pytest.skip(f"Go load generator not buildable here: {missing}")
    results = relayfloor.run(tmp_path, duration=0.5, warmup=0.2, inflights=(1, 4))
    assert [(r.path, r.inflight) for r in results] == [
        (path, n) for path in ("floor", "relay", "relay+audit", "batched+audit") for n in (1, 4)
    ]
    for result in results:
        assert result.errors == 0, result
        assert result.count > 0 and 0 < result.p50_ms <= result.p99_ms
        if result.path != "floor":
            # Every process of the chain was watched: the report's CPU per call needs it.
            for process in ("grpc relay", "responder", "nats-server"):
                assert result.cpu.get(process, 0.0) > 0.0, (result.path, process)
    report = relayfloor.report(results, (0.0, 0.0))
    assert "| batched+audit | 4 |" in report and "total" in report
