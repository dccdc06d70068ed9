"""The floor measurement (bench/floor.py) runs for real: a grpc.aio server over mutual TLS
answering the Go client, whose sample responses must verify against the floor's key."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import floor
from bench.load import go_available


def test_floor_serves_verified_signatures_and_counts_its_cpu(tmp_path: Path) -> None:
    missing = go_available()
    if missing:
        pytest.skip(f"Go load generator not buildable here: {missing}")
    results = floor.run(tmp_path, duration=0.5, warmup=0.2, inflights=(1, 4))
    # One server, one run per level, in the order asked: the unary targets compare the
    # floor's p50 at 1 in flight and its rate at 64.
    assert [r.inflight for r in results] == [1, 4]
    for result in results:
        assert result.errors == 0
        assert result.count > 0 and result.rate > 0
        assert 0 < result.p50_ms <= result.p99_ms
        # The server process was watched: the report's CPU per call depends on it.
        assert result.cpu.get("grpc.aio server", 0.0) > 0.0
        assert "go client" in result.note
