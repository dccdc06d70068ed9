"""The benchmark's pure helpers (bench.stats, bench.load.split, bench.profile's stack
summary, bench.report's target verdicts and sections): the bench itself never runs in
`make test`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from bench.load import split
from bench.profile import summarise_collapsed
from bench.report import targets, write
from bench.stats import (
    RunResult,
    histogram,
    markdown_table,
    memory_table,
    percentile,
    runs_table,
    summarise,
)


def test_percentile_interpolates_between_ranks() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile([7.0], 99) == 7.0


def test_percentile_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarise_turns_seconds_into_rate_and_milliseconds() -> None:
    run = summarise("e2e", "hsm0", "ec-p256", 16, [0.002] * 99 + [0.1], seconds=2.0, errors=3)
    assert run.count == 100
    assert run.rate == pytest.approx(50.0)
    assert run.p50_ms == pytest.approx(2.0)
    assert run.max_ms == pytest.approx(100.0)
    assert run.errors == 3


def test_summarise_of_a_run_with_nothing_done_is_zero_not_a_crash() -> None:
    run = summarise("e2e", "hsm0", "ec-p256", 1, [], seconds=1.0, errors=5)
    assert run.rate == 0.0 and run.count == 0 and math.isnan(run.p99_ms)
    assert "n/a" in runs_table([run])


def test_tables_render_rows_and_right_align_numbers() -> None:
    table = markdown_table(("name", "n"), [("a", "1,234"), ("b", "5")])
    lines = table.splitlines()
    assert lines[0] == "| name | n |"
    assert lines[1] == "| --- | ---: |"
    assert lines[2] == "| a | 1,234 |"
    memory = memory_table({"broker": 2048}, {"broker": 4096})
    assert "| broker | 2.0 | 4.0 |" in memory
    assert "| **total** | 2.0 | 4.0 |" in memory


def test_histogram_counts_every_sample() -> None:
    edges, counts = histogram([0.001, 0.002, 0.010, 0.100], bins=10)
    assert len(edges) == 11 and sum(counts) == 4
    assert edges[0] == pytest.approx(1.0) and edges[-1] == pytest.approx(100.0)


def test_split_shares_inflight_among_processes() -> None:
    assert split(64, 2) == [32, 32]
    assert split(5, 2) == [3, 2]
    assert split(1, 4) == [1]


def test_collapsed_stacks_give_self_time_and_layers() -> None:
    text = (
        "main (broker/__main__.py:5);run (asyncio/events.py:80);sign (pkcs11/types.py:10) 30\n"
        "main (broker/__main__.py:5);Sign (broker/keys.py:99) 10\n"
        "main (broker/__main__.py:5);select (selectors.py:415) 10\n"
    )
    summary = summarise_collapsed(text)
    assert summary["samples"] == 50
    assert summary["self"][0] == ("sign (pkcs11/types.py)", 60.0)
    layers = dict(summary["layers"])
    assert layers["pkcs11 (token call)"] == 60.0
    assert layers["edgekms code"] == 20.0  # main() in __main__.py does not count
    assert layers["asyncio loop and select, self time"] == 20.0


def _run(provider: str, inflight: int, rate: float, p50: float, p99: float) -> dict[str, object]:
    return RunResult(
        "e2e", provider, "ec-p256", inflight, 100, 0, 1.0, rate, p50, p50, p99, p99
    ).to_json()


def test_target_verdicts_follow_the_figures() -> None:
    results = {
        "e2e": [_run("hsm0", 64, 4500.0, 5.0, 15.0), _run("hsm0", 1, 900.0, 1.5, 2.0)],
        "memory_kb": {"idle": {"broker": 40 * 1024}, "peak": {"broker": 50 * 1024}},
        "ready_seconds": {"cold": 3.0, "warm": 1.5},
    }
    verdicts = {t.name: t.met for t in targets(results)}
    assert verdicts["SoftHSM P-256 e2e, 64 in flight"] is True
    assert verdicts["  … p50 at 1 in flight"] is False
    assert verdicts["RSS broker (peak)"] is False
    assert verdicts["start to ready (warm)"] is True
    assert verdicts["issuance at 1 in flight"] is None


def test_memory_table_shows_idle_pss_when_measured() -> None:
    table = memory_table({"broker": 2048, "ca": 1024}, {"broker": 4096}, {"broker": 1024})
    assert table.splitlines()[0] == "| process | idle MB | peak under load MB | idle PSS MB |"
    assert "| broker | 2.0 | 4.0 | 1.0 |" in table
    assert "| **total** | 3.0 | 4.0 | 1.0 |" in table


def test_pss_sum_is_reported_beside_the_rss_target_without_kmsctl_up() -> None:
    results = {
        "memory_kb": {
            "idle": {"broker": 100 * 1024},
            "peak": {"broker": 160 * 1024},
            "idle_pss": {"broker": 140 * 1024, "kmsctl-up": 30 * 1024},
        },
    }
    verdicts = {t.name: (t.met, t.measured) for t in targets(results)}
    assert verdicts["RSS stack + nats-server (sum of peaks)"][0] is False
    met, measured = verdicts["… stack + nats-server, sum of idle PSS (for reference)"]
    assert met is True and measured == "140.0 MB"  # the supervisor is not part of the stack


def test_report_has_the_floor_section_with_cpu_per_call(tmp_path: Path) -> None:
    floor = summarise(
        "floor", "none", "ec-p256", 64, [0.01] * 400, 2.0, cpu={"grpc.aio server": 1.0}
    )
    results = {"settings": {"warmup_s": 1.0, "duration_s": 2.0}, "floor": [floor.to_json()]}
    write(results, tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert "## The floor under the broker" in text
    # 1.0 CPU-second over 2 s at 200 calls/s: 2,500 µs a call.
    assert "at 64 in flight grpc.aio server 2,500 µs" in text


def test_unary_targets_are_judged_against_the_floor_of_the_same_run() -> None:
    def run(kind: str, inflight: int, latency: float, count: int) -> dict[str, Any]:
        return summarise(
            kind, "hsm0" if kind == "e2e" else "none", "ec-p256", inflight,
            [latency] * count, 1.0,
        ).to_json()  # fmt: skip

    results = {
        # EdgeKMS: 3,000/s at 64, p50 1.40 ms at 1; the floor: 5,000/s, p50 0.80 ms.
        "e2e": [run("e2e", 64, 0.02, 3000), run("e2e", 1, 0.0014, 700)],
        "floor": [run("floor", 1, 0.0008, 1200), run("floor", 64, 0.012, 5000)],
    }
    verdicts = {t.name: (t.met, t.measured) for t in targets(results)}
    met, measured = verdicts["  … vs grpc.aio floor, 64 in flight"]
    assert met is False and measured == "60% (3,000 of 5,000/s)"
    met, measured = verdicts["  … p50 at 1 in flight vs the floor's"]
    assert met is False and measured == "1.40 vs 0.80 ms (+0.60)"
    results["floor"] = [run("floor", 1, 0.001, 1000), run("floor", 64, 0.012, 4000)]
    verdicts = {t.name: (t.met, t.measured) for t in targets(results)}
    assert verdicts["  … vs grpc.aio floor, 64 in flight"][0] is True
    assert verdicts["  … p50 at 1 in flight vs the floor's"][0] is True
    # Without a floor in the run, nothing is judged.
    del results["floor"]
    verdicts = {t.name: (t.met, t.measured) for t in targets(results)}
    assert verdicts["  … vs grpc.aio floor, 64 in flight"] == (None, "n/a")
