"""`python -m bench.ca_scale`: the mini-CA with 50,000 certificates stored (issue 12
"Speed", issue 11 item 2). Part of `make bench`; alone it takes a few minutes.

On a `kmsctl up` stack: issuance through the broker with an empty store; then 50,000
records seeded through the CA's store module (bench.seed; 10 % revoked, notAfter spread
from 100 days ago to 700 days ahead); the first listing after that (the CA's catalog
catching up), the first page of an unfiltered listing, the first page and every page of
`--expiring 30d` and of a subject match (each checked against what was seeded);
issuance again with 50,000 stored; then revoked records up to 50,000 revoked, and
revocation and CRL figures at that size: one revocation's latency, the time until the
CRL lists it, fetching the 2.4 MB CRL through the broker; and the CA's resident memory.
Results: bench/results/ca_scale.json and ca_scale.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bench import stackrun
from bench.issuance import _init_ca, make_csrs
from bench.procs import rss_kb
from bench.seed import seed_records

log = logging.getLogger("bench.ca_scale")

T = TypeVar("T")
STORED = 50_000
REVOKED_TARGET = 50_000
ISSUED = 64


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def _ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_ms": round(statistics.median(ordered) * 1e3, 1),
        "p95_ms": round(ordered[max(0, int(len(ordered) * 0.95) - 1)] * 1e3, 1),
        "max_ms": round(ordered[-1] * 1e3, 1),
        "runs": len(ordered),
    }


async def _seed(
    data_dir: Path,
    nats_url: str,
    count: int,
    der: bytes,
    revoked: Callable[[int], bool],
    prefix: str,
) -> tuple[Any, float]:
    import nats

    from ca_service.store import CAStore
    from edgekms.sealed import WRITER_CA
    from mgmt.natsauth import CA_USER
    from mgmt.sealkeys import local_seal

    nc = await nats.connect(nats_url, **stackrun.bus_options(data_dir, CA_USER))
    try:
        # Sealed as the CA seals its records (edgekms.sealed): the CA refuses others.
        seal = local_seal(data_dir / "secrets", WRITER_CA)
        store = await CAStore.open(nc.jetstream(), seal=seal)
        started = time.perf_counter()
        logging.getLogger("ca_service.store").setLevel(logging.WARNING)
        seeded = await seed_records(store, count, der, revoked=revoked, prefix=prefix)
        return seeded, time.perf_counter() - started
    finally:
        await nc.close()


def _issuance(kms: Any, csrs: tuple[bytes, ...]) -> dict[str, Any]:
    """Issue every CSR, 8 at a time from threads (one gRPC channel, as an admin's script
    would), through the broker; rate and latency. In-process rather than bench.issuance's
    spawned load process, whose start alone outlasts its window on a loaded machine."""
    from concurrent.futures import ThreadPoolExecutor

    def one(csr: bytes) -> float:
        started = time.perf_counter()
        kms.issue_certificate("https-server", csr)
        return time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        times = list(pool.map(one, csrs))
    seconds = time.perf_counter() - started
    return {**_ms(times), "rate_per_s": round(len(times) / seconds, 1), "inflight": 8}


def run(stack: stackrun.RunningStack) -> dict[str, Any]:
    from cryptography import x509

    from edgekms.v1 import ca_pb2
    from mgmt.client import KMSClient

    out: dict[str, Any] = {"stored": STORED}
    _init_ca(stack.client_config)
    kms = KMSClient.from_config(stack.client_config, timeout=120)
    try:
        real = kms.issue_certificate("https-server", make_csrs(1)[0]).record
        csrs = make_csrs(ISSUED)
        out["issue_empty"] = _issuance(kms, csrs)

        seeded, seconds = asyncio.run(
            _seed(stack.data_dir, stack.nats_url, STORED, real.certificate_der,
                  lambda i: i % 10 == 0, "seed")
        )  # fmt: skip
        out["seed_seconds"] = round(seconds, 1)
        out["seed_rate_per_s"] = round(STORED / seconds)

        def page(request: ca_pb2.ListCertificatesRequest) -> ca_pb2.ListCertificatesResponse:
            return kms.list_certificates_page(request)

        _, catch_up = _timed(lambda: page(ca_pb2.ListCertificatesRequest()))
        out["first_list_after_seeding_ms"] = round(catch_up * 1e3, 1)
        firsts = [_timed(lambda: page(ca_pb2.ListCertificatesRequest()))[1] for _ in range(30)]
        out["first_page_100"] = _ms(firsts)
        expiring_first = [
            _timed(lambda: page(ca_pb2.ListCertificatesRequest(expiring_within_days=30)))[1]
            for _ in range(30)
        ]
        out["first_page_expiring_30d"] = _ms(expiring_first)
        match_first = [
            _timed(lambda: page(ca_pb2.ListCertificatesRequest(match="seed4242.home")))[1]
            for _ in range(30)
        ]
        out["first_page_match"] = _ms(match_first)
        listed, whole = _timed(lambda: kms.list_certificates(expiring_within_days=30))
        # Seeded ones expiring within 30 days, plus the issuance runs' certificates if any.
        seeded_expiring = [r for r in listed if r.requester == "seed"]
        out["expiring_30d_all_pages"] = {
            "ms": round(whole * 1e3, 1),
            "listed": len(listed),
            "seeded_expected": seeded.expiring_30d,
            "seeded_listed": len(seeded_expiring),
            "correct": len(seeded_expiring) == seeded.expiring_30d,
        }
        everything, all_pages = _timed(
            lambda: sum(1 for _ in kms.iter_certificates(page_size=1000))
        )
        out["all_records_pages_of_1000"] = {"ms": round(all_pages * 1e3, 1), "listed": everything}
        out["issue_50k"] = _issuance(kms, csrs)

        more = REVOKED_TARGET - seeded.revoked
        _, seconds = asyncio.run(
            _seed(stack.data_dir, stack.nats_url, more, real.certificate_der,
                  lambda i: True, "gone")
        )  # fmt: skip
        out["revoked"] = REVOKED_TARGET + 1
        # The CA reads what was seeded behind its back first (a listing waits for that),
        # so the figures below are the CA's own work, not the catch-up.
        _, warm = _timed(lambda: page(ca_pb2.ListCertificatesRequest()))
        out["catch_up_45k_ms"] = round(warm * 1e3, 1)
        before = kms.get_crl().crl_number
        # One revocation: how long it takes, and how long until the CRL lists it.
        revoked, revoke_s = _timed(lambda: kms.revoke_certificate(real.serial))
        started = time.perf_counter()
        deadline = started + 300
        crl = kms.get_crl()
        while crl.crl_number < revoked.crl_number and time.perf_counter() < deadline:
            time.sleep(0.05)
            crl = kms.get_crl()
        listed_after = time.perf_counter() - started
        entries = len(x509.load_der_x509_crl(crl.crl_der))
        out["revoke_ms"] = round(revoke_s * 1e3, 1)
        out["crl_after_revoke"] = {
            "ms_until_fetched": round(listed_after * 1e3, 1),
            "crl_number": crl.crl_number,
            "previous_number": before,
            "reserved_number": revoked.crl_number,
            "entries": entries,
            "bytes": len(crl.crl_der),
        }
        fetches = [_timed(kms.get_crl)[1] for _ in range(5)]
        out["crl_fetch_via_broker"] = _ms(fetches)
        # Sequential revocations at 50,000 revoked: the rate must not depend on CRL size.
        valid = kms.iter_certificates(state=ca_pb2.CERTIFICATE_STATE_VALID, page_size=50)
        times = []
        for record in itertools.islice(valid, 50):
            started = time.perf_counter()
            kms.revoke_certificate(record.serial)
            times.append(time.perf_counter() - started)
        out["revoke_sequential_at_50k"] = {
            **_ms(times),
            "rate_per_s": round(len(times) / sum(times), 1),
        }
        final, _ = _timed(kms.get_crl)  # waits for the builds those revocations started
        out["crl_final_entries"] = len(x509.load_der_x509_crl(final.crl_der))
        # Once more with the CA's CRL entries built: the cost of one CRL at this size.
        last = next(kms.iter_certificates(state=ca_pb2.CERTIFICATE_STATE_VALID, page_size=1))
        warm_revoke = kms.revoke_certificate(last.serial)
        started = time.perf_counter()
        latest = kms.get_crl()
        while latest.crl_number < warm_revoke.crl_number and time.perf_counter() < started + 300:
            time.sleep(0.05)
            latest = kms.get_crl()
        out["crl_warm"] = {
            "ms_until_fetched": round((time.perf_counter() - started) * 1e3, 1),
            "entries": len(x509.load_der_x509_crl(latest.crl_der)),
        }
        out["ca_rss_mb"] = round(rss_kb(stack.pids()["ca"]) / 1024, 1)
    finally:
        kms.close()
    return out


def _pair(figure: dict[str, Any]) -> str:
    return f"{figure['p50_ms']} / {figure['p95_ms']} ms"


def write(results: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ca_scale.json").write_text(json.dumps(results, indent=2) + "\n")
    r = results
    expiring = r["expiring_30d_all_pages"]
    every = r["all_records_pages_of_1000"]
    crl = r["crl_after_revoke"]
    sequential = r["revoke_sequential_at_50k"]
    rows = [
        (
            f"seeding {r['stored']:,} records through CAStore",
            f"{r['seed_seconds']} s ({r['seed_rate_per_s']:,}/s)",
        ),
        ("first page after seeding them behind the CA's back (it reads them first)",
         f"{r['first_list_after_seeding_ms']} ms"),
        ("first page (100), unfiltered, p50 / p95", _pair(r["first_page_100"])),
        ("first page, `--expiring 30d`, p50 / p95", _pair(r["first_page_expiring_30d"])),
        ("first page, subject match, p50 / p95", _pair(r["first_page_match"])),
        (
            "`--expiring 30d`, every page",
            f"{expiring['ms']} ms, {expiring['listed']} listed; seeded ones "
            f"{expiring['seeded_listed']} of {expiring['seeded_expected']} "
            f"(correct: {expiring['correct']})",
        ),
        ("every record, pages of 1000", f"{every['ms']} ms for {every['listed']:,}"),
        (
            f"issuing {ISSUED} certificates, 8 in flight, empty store",
            f"{r['issue_empty']['rate_per_s']}/s, p50 {r['issue_empty']['p50_ms']} ms",
        ),
        (
            f"issuing {ISSUED} certificates, 8 in flight, {r['stored']:,} stored",
            f"{r['issue_50k']['rate_per_s']}/s, p50 {r['issue_50k']['p50_ms']} ms",
        ),
        ("the CA reading 45,000 more seeded records", f"{r['catch_up_45k_ms']} ms"),
        (f"one revocation with {r['revoked']:,} revoked", f"{r['revoke_ms']} ms"),
        (
            "from that revocation until the CRL listing it is fetched (entries built afresh)",
            f"{crl['ms_until_fetched']} ms ({crl['entries']:,} entries, {crl['bytes']:,} bytes)",
        ),
        ("fetching that CRL through the broker, p50", f"{r['crl_fetch_via_broker']['p50_ms']} ms"),
        (
            "one more revocation until the CRL listing it is fetched (entries cached)",
            f"{r['crl_warm']['ms_until_fetched']} ms ({r['crl_warm']['entries']:,} entries)",
        ),
        (
            f"50 revocations one after another at {r['revoked']:,} revoked",
            f"{sequential['rate_per_s']}/s, p50 {sequential['p50_ms']} ms",
        ),
        ("CA service resident, at the end", f"{r['ca_rss_mb']} MB"),
    ]  # fmt: skip
    lines = [
        "# The CA with 50,000 certificates stored",
        "",
        f"Measured {r.get('when', '')} on {r.get('host', '')}; `python -m bench.ca_scale`.",
        "",
        "| figure | value |",
        "| --- | --- |",
        *(f"| {label} | {value} |" for label, value in rows),
        "",
    ]
    (out_dir / "ca_scale.md").write_text("\n".join(lines))


def run_fresh(work: Path) -> dict[str, Any]:
    """`run` on a `kmsctl up` stack of its own under `work`, stopped afterwards."""
    import os
    import platform

    work.mkdir(parents=True, exist_ok=True)
    stack = stackrun.start(work / "data")
    try:
        results = run(stack)
    finally:
        log.info("stack stopped: %d", stack.stop())
    results["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results["host"] = f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ca_scale", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data dir")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(tempfile.mkdtemp(prefix="edgekms-ca-scale-"))
    try:
        results = run_fresh(work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    write(results, args.out)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
