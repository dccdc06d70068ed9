"""ACME orders per second: new order → http-01 → finalize → certificate download, at 1 and
16 orders in flight, against the CA's ACME server on a `kmsctl up --acme` stack of its
own (SoftHSM; every certificate signed in the token and stored as a CA record, every
order audited).

The client is bench.acmeclient (http.client and cryptography, one TLS connection per
request, as the server closes after each answer); http-01 is answered locally by a
threaded HTTP server in this process, so the figure is the CA's: JWS checks, KV writes,
the validation fetch, signing and storing. One account per worker, made before the
clock starts. `python -m bench.acme` runs it alone.
"""

from __future__ import annotations

import argparse
import http.server
import json
import logging
import os
import platform
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import stackrun
from bench.acmeclient import AcmeClient
from bench.stats import RunResult, summarise
from mgmt.natsserver import free_port

log = logging.getLogger(__name__)
LEVELS = (1, 16)


class _Answers(http.server.BaseHTTPRequestHandler):
    """GET /.well-known/acme-challenge/<token> → its key authorization."""

    answers: dict[str, str] = {}

    def do_GET(self) -> None:
        token = self.path.rsplit("/", 1)[-1]
        body = self.answers.get(token, "").encode()
        self.send_response(200 if body else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        return


def _serve_answers(port: int) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _answer(token: str, key_authorization: str) -> None:
    _Answers.answers[token] = key_authorization


def measure(directory: str, root: str, inflight: int, duration: float, warmup: float) -> RunResult:
    clients = [AcmeClient(directory, root) for _ in range(inflight)]
    for client in clients:
        client.register()
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration

    def worker(n: int) -> None:
        nonlocal errors
        client = clients[n]
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                client.obtain([f"w{n}.bench.home.arpa"], _answer)
            except Exception as exc:
                log.warning("acme order failed: %s", exc)
                with lock:
                    errors += 1
                continue
            t1 = time.perf_counter()
            if t0 >= measure_from and t1 <= stop_at:
                with lock:
                    latencies.append(t1 - t0)

    with ThreadPoolExecutor(inflight) as pool:
        list(pool.map(worker, range(inflight)))
    return summarise("acme-order", "hsm0", "ec-p256", inflight, latencies, duration, errors)


def run_fresh(work: Path, duration: float = 10.0, warmup: float = 2.0) -> list[RunResult]:
    """A `kmsctl up --acme` stack under `work`, `ca init`, then one run per level."""
    from mgmt.client import KMSClient

    work.mkdir(parents=True, exist_ok=True)
    http_port, acme_port = free_port(), free_port()
    config = work / "acme.toml"
    hosts = "".join(f'"w{n}.bench.home.arpa" = "127.0.0.1"\n' for n in range(max(LEVELS)))
    config.write_text(f'http01_port = {http_port}\nallow_dns = ["home.arpa"]\n[hosts]\n{hosts}')
    stack = stackrun.start(
        work / "data",
        extra=("--acme", f"127.0.0.1:{acme_port}", "--acme-config", str(config)),
    )
    answers = _serve_answers(http_port)
    try:
        with KMSClient.from_config(stack.client_config, timeout=120) as kms:
            init = kms.ca_init("Bench CA")
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        root = work / "root.pem"
        root.write_bytes(
            x509.load_der_x509_certificate(init.root_certificate_der).public_bytes(
                serialization.Encoding.PEM
            )
        )
        directory = f"https://127.0.0.1:{acme_port}/acme/directory"
        deadline = time.monotonic() + 60
        while True:
            try:
                AcmeClient(directory, str(root)).load_directory()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        results = []
        for level in LEVELS:
            result = measure(directory, str(root), level, duration, warmup)
            log.warning(
                "acme inflight=%d rate=%.1f/s p50=%.0fms", level, result.rate, result.p50_ms
            )
            results.append(result)
        return results
    finally:
        answers.shutdown()
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.acme", description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    work = Path(tempfile.mkdtemp(prefix="edgekms-acme-bench-"))
    try:
        runs = run_fresh(work, args.duration, args.warmup)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    value = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        "runs": [r.to_json() for r in runs],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "acme.json").write_text(json.dumps(value, indent=1) + "\n")
    print(json.dumps(value, indent=1))


if __name__ == "__main__":
    main()
