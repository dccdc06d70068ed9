"""bench.procs.PssWatch against a real process: what the board's memory target is judged
on (the peak of the per-instant PSS sum with the load running) must be read from /proc,
not assumed."""

from __future__ import annotations

import subprocess
import sys
import time

from bench.procs import PssWatch, pss_kb, rss_kb
from bench.stackmem import table


def test_pss_watch_samples_a_live_process_and_sums_each_instant() -> None:
    # A process that allocates ~20 MB after start, so a peak above its start is real.
    code = "import sys, time; sys.stdin.readline(); b = bytearray(20 << 20); time.sleep(60)"
    process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while pss_kb(process.pid) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        start_rss = rss_kb(process.pid)
        watch = PssWatch({"child": process.pid, "gone": 2**22 + 7}, interval=0.05)
        watch.start()
        assert process.stdin is not None
        process.stdin.write(b"go\n")
        process.stdin.flush()
        while watch.peak_rss_kb["child"] < start_rss + 15 * 1024:
            assert time.monotonic() < deadline, watch.peak_rss_kb
            time.sleep(0.05)
        watch.stop()
    finally:
        process.kill()
        process.wait()
    assert watch.peak_pss_kb["child"] > 15 * 1024
    # A process that does not exist counts 0, and every sample is one instant's sum.
    assert watch.peak_pss_kb["gone"] == 0 and watch.peak_rss_kb["gone"] == 0
    assert len(watch.sums_pss_kb) >= 2
    assert max(watch.sums_pss_kb) <= watch.peak_pss_kb["child"]
    assert set(watch.cpu) == {"child", "gone"} and watch.cpu["gone"] == 0.0


def test_table_reports_the_loaded_window() -> None:
    sample = {"a": {"rss_kb": 2048, "pss_kb": 1024}}
    result = {
        "idle": sample,
        "after_signing": sample,
        "under_load": {
            "seconds": 15.0,
            "sign_inflight": 16,
            "signs_per_s": 100.0,
            "issue_inflight": 4,
            "issued_per_s": 10.0,
            "samples": 3,
            "peak_rss_kb": {"a": 3072},
            "peak_pss_kb": {"a": 2048},
            "cpu_seconds": {"a": 1.5},
            "pss_sum_peak_kb": 2048,
            "pss_sum_mean_kb": 1536,
            "pss_peak_sum_without_supervisor_kb": 2048,
        },
    }
    text = table(result)
    assert "| a | 3.0 | 2.0 | 1.50 |" in text
    assert "peak of the sum: **2.0 MB** (mean 1.5 MB)" in text
