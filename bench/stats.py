"""Pure helpers of the benchmark: percentiles, run summaries and the Markdown report.

Kept free of I/O so tests/bench can check them without starting anything.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks.

    Interpolating (rather than nearest rank) keeps p99 of a few hundred samples from
    jumping to the single slowest one."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} outside 0..100")
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    rank = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = math.ceil(rank)
    frac = rank - lo
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac)


@dataclass
class RunResult:
    """One measured run: `count` operations done in `seconds` at `inflight` concurrency."""

    path: str  # "raw", "e2e", "issue-kms", "issue-cfssl"
    provider: str  # "hsm0"/"softhsm", "tpm0"/"swtpm", "cfssl"
    key_type: str
    inflight: int
    count: int
    errors: int
    seconds: float
    rate: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds in the run
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarise(
    path: str,
    provider: str,
    key_type: str,
    inflight: int,
    latencies: Iterable[float],
    seconds: float,
    errors: int = 0,
    cpu: Mapping[str, float] | None = None,
    note: str = "",
) -> RunResult:
    """A RunResult from raw per-operation latencies (seconds) over a window of `seconds`."""
    values = sorted(latencies)
    if seconds <= 0:
        raise ValueError("a run must last some time")
    if not values:
        nan = math.nan
        return RunResult(
            path, provider, key_type, inflight, 0, errors, seconds, 0.0, nan, nan, nan, nan,
            cpu=dict(cpu or {}), note=note,
        )  # fmt: skip
    return RunResult(
        path=path,
        provider=provider,
        key_type=key_type,
        inflight=inflight,
        count=len(values),
        errors=errors,
        seconds=seconds,
        rate=len(values) / seconds,
        p50_ms=percentile(values, 50) * 1000,
        p95_ms=percentile(values, 95) * 1000,
        p99_ms=percentile(values, 99) * 1000,
        max_ms=values[-1] * 1000,
        cpu=dict(cpu or {}),
        note=note,
    )


def histogram(latencies: Sequence[float], bins: int = 40) -> tuple[list[float], list[int]]:
    """Log-spaced bin edges (ms) and counts, so a chart shows p50 and the tail together."""
    values = [v * 1000 for v in latencies if v > 0]
    if not values:
        return [], []
    lo, hi = min(values), max(values)
    if hi <= lo:
        hi = lo * 1.01 + 1e-6
    step = (math.log10(hi) - math.log10(lo)) / bins
    edges = [10 ** (math.log10(lo) + i * step) for i in range(bins + 1)]
    counts = [0] * bins
    for v in values:
        i = min(int((math.log10(v) - math.log10(lo)) / step), bins - 1) if step > 0 else 0
        counts[i] += 1
    return edges, counts


def _fmt(value: float, digits: int = 2) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return f"{value:,.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub Markdown table; numbers are right-aligned."""
    body = [list(map(str, r)) for r in rows]
    aligns = []
    for i, _ in enumerate(headers):
        numeric = bool(body) and all(_looks_numeric(r[i]) for r in body if i < len(r))
        aligns.append("---:" if numeric else "---")
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(aligns) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def _looks_numeric(cell: str) -> bool:
    text = cell.replace(",", "").replace("%", "").replace("n/a", "").strip()
    if not text:
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


def runs_table(runs: Iterable[RunResult]) -> str:
    """The throughput/latency table of the report."""
    rows = [
        (
            r.path,
            r.provider,
            r.key_type,
            r.inflight,
            _fmt(r.rate, 0),
            _fmt(r.p50_ms),
            _fmt(r.p95_ms),
            _fmt(r.p99_ms),
            r.errors,
        )
        for r in runs
    ]
    headers = (
        "path",
        "provider",
        "key",
        "in flight",
        "ops/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "errors",
    )
    return markdown_table(headers, rows)


def memory_table(
    idle: Mapping[str, int], loaded: Mapping[str, int], idle_pss: Mapping[str, int] | None = None
) -> str:
    """Resident memory (VmRSS, kB in, MB out) of each process idle and at peak under load,
    and, when measured, its idle PSS (shared pages divided among the processes using them)."""
    pss = idle_pss or {}
    names = list(dict.fromkeys([*idle, *loaded]))
    rows = []
    for name in names:
        row = [name, _fmt(idle.get(name, 0) / 1024, 1), _fmt(loaded.get(name, 0) / 1024, 1)]
        if pss:
            row.append(_fmt(pss.get(name, 0) / 1024, 1))
        rows.append(tuple(row))
    total = ["**total**", _fmt(sum(idle.values()) / 1024, 1), _fmt(sum(loaded.values()) / 1024, 1)]
    if pss:
        total.append(_fmt(sum(pss.values()) / 1024, 1))
    rows.append(tuple(total))
    header = ("process", "idle MB", "peak under load MB", *(("idle PSS MB",) if pss else ()))
    return markdown_table(header, rows)


@dataclass(frozen=True)
class Target:
    name: str
    goal: str
    measured: str
    met: bool | None  # None: not measured


def targets_table(targets: Iterable[Target]) -> str:
    verdict = {True: "met", False: "**missed**", None: "not measured"}
    return markdown_table(
        ("target", "goal", "measured", "verdict"),
        ((t.name, t.goal, t.measured, verdict[t.met]) for t in targets),
    )
