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
    result = floor.run(tmp_path, duration=0.5, warmup=0.2, inflight=4)
    assert result.errors == 0
    assert result.count > 0 and result.rate > 0
    # The server process was watched: the report's CPU per call depends on it.
    assert result.cpu.get("grpc.aio server", 0.0) > 0.0
    assert "go client" in result.note
