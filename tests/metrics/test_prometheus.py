"""A real Prometheus (Debian's package) scrapes every service of a real `kmsctl up`
stack (SoftHSM and swtpm) from a config generated from the stack's state file, and its
HTTP API answers queries with the series docs/architecture.md ("Metrics") promises.
The same run floods the broker's endpoint with scrapes and checks that no scrape shows
a PIN, a key name or key material."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from edgekms.errors import NotFound
from mgmt.natsserver import free_port
from tests.conftest import SLOWDOWN
from tests.e2e.conftest import KmsStack, start_stack, stop_stack

BIN = Path(sys.executable).parent
RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "edgekms-rules.yml"
PARTS = {"broker", "ca", "crypto-hsm0", "crypto-tpm0"}

pytestmark = [
    pytest.mark.tpm,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus"),
]


def _http(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout * SLOWDOWN) as answer:  # noqa: S310
            return int(answer.status), bytes(answer.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def _kmsctl(stack: KmsStack, *args: str) -> str:
    done = subprocess.run(
        [str(BIN / "kmsctl"), *args],
        env=stack.env(),
        capture_output=True,
        text=True,
        timeout=120 * SLOWDOWN,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsStack]:
    running = start_stack(tmp_path_factory.mktemp("metrics") / "data", "--tpm", "swtpm")
    yield running
    assert stop_stack(running) == 0


@pytest.fixture(scope="module")
def prometheus(stack: KmsStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus scraping every target the stack's state file lists, every second."""
    urls = stack.state()["metrics"]
    assert isinstance(urls, dict) and set(urls) == PARTS, urls
    targets = [urllib.parse.urlsplit(str(u)).netloc for u in urls.values()]
    home = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "edgekms",
                "scrape_timeout": "1s",
                "static_configs": [{"targets": targets}],
            }
        ],
    }
    (home / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    with open(home / "prometheus.log", "wb") as log:
        process = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={home / 'prometheus.yml'}",
                f"--storage.tsdb.path={home / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60 * SLOWDOWN
        while True:
            assert process.poll() is None, (home / "prometheus.log").read_text()[-2000:]
            try:
                if _http(f"{base}/-/ready", 2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prometheus not ready"
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _query(base: str, expr: str) -> list[dict[str, Any]]:
    status, body = _http(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert status == 200, body[:300]
    answer = json.loads(body)
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


def _wait_for(base: str, expr: str, count: int, seconds: float = 90.0) -> list[dict[str, Any]]:
    """The result of `expr` once it has `count` series (a deadline, not a sleep)."""
    deadline = time.monotonic() + seconds * SLOWDOWN
    while True:
        result = _query(base, expr)
        if len(result) == count:
            return result
        assert time.monotonic() < deadline, f"{expr}: {result}"
        time.sleep(0.5)


def test_prometheus_scrapes_every_service_and_finds_the_series(
    stack: KmsStack, prometheus: str
) -> None:
    with stack.client() as kms:
        kms.create_key("app/metrics-probe", "ec-p256")
        kms.sign("app/metrics-probe", b"a message")
    # A refusal, counted under its own outcome.
    with stack.client() as kms, pytest.raises(NotFound):
        kms.sign("app/no-such-key", b"x")
    _kmsctl(stack, "ca", "init", "--name", "Metrics CA")
    # One certificate inside the 30-day window.
    _kmsctl(
        stack,
        "cert", "issue", "--profile", "https-server", "--generate", "--cn", "soon.home.arpa",
        "--san", "dns:soon.home.arpa", "--days", "10",
        "--out", str(stack.data_dir.parent / "soon.crt"),
        "--key-out", str(stack.data_dir.parent / "soon.key"),
    )  # fmt: skip

    up = _wait_for(prometheus, 'up{job="edgekms"} == 1', 4)
    assert len({r["metric"]["instance"] for r in up}) == 4
    checks = {
        'edgekms_requests_total{service="broker",'
        'method="edgekms.v1.KeyService/Sign",outcome="ok"} >= 1': 1,
        'edgekms_requests_total{service="broker",outcome="not_found"} >= 1': 1,
        'edgekms_request_duration_seconds_count{service="crypto-hsm0",method="Sign"} >= 1': 1,
        'edgekms_request_duration_seconds_bucket{service="broker",le="+Inf",'
        'method="edgekms.v1.KeyService/Sign"} >= 1': 1,
        "edgekms_bus_connected == 1": 4,
        'edgekms_token_up{provider=~"hsm0|tpm0"} == 1': 2,
        'edgekms_tpm_lockout_counter{provider="tpm0"} >= 0': 1,
        'edgekms_tpm_in_lockout{provider="tpm0"} == 0': 1,
        'edgekms_tpm_max_auth_fail{provider="tpm0"} > 0': 1,
        "edgekms_crl_next_update_timestamp_seconds > time()": 1,
        "edgekms_crl_age_seconds < 3600": 1,
        'edgekms_certificates_expiring{within="30d"} == 1': 1,
        'edgekms_audit_chain_entries{stream="KMS_AUDIT_BROKER"} > 0': 1,
        "edgekms_audit_chain_ok == 1": 1,
        "time() - edgekms_audit_last_verification_timestamp_seconds < 120": 1,
    }  # fmt: skip
    for expr, count in checks.items():
        _wait_for(prometheus, expr, count)
    # The example rules loaded into the same server, and none of them fires here.
    status, body = _http(f"{prometheus}/api/v1/rules")
    assert status == 200
    groups = json.loads(body)["data"]["groups"]
    assert {rule["name"] for g in groups for rule in g["rules"]} >= {
        "EdgeKMSServiceDown",
        "EdgeKMSTPMLockout",
        "EdgeKMSCRLExpiresSoon",
    }
    assert _query(prometheus, 'ALERTS{alertstate="firing",severity="critical"}') == []


def test_health_endpoints_and_no_secret_in_any_scrape(stack: KmsStack) -> None:
    urls = {k: str(v) for k, v in dict(stack.state()["metrics"]).items()}  # type: ignore[call-overload]
    # `kmsctl status` names every endpoint, for a person (text) and a script (json).
    assert json.loads(_kmsctl(stack, "status", "-o", "json"))["metrics"] == urls
    status_text = _kmsctl(stack, "status")
    assert "metrics (/healthz and /readyz beside each):" in status_text
    assert all(f"{part:<14} {url}" in status_text for part, url in urls.items())
    secrets_dir = stack.data_dir / "secrets"
    secrets = [
        p.read_bytes().strip()
        for p in secrets_dir.rglob("*")
        if p.is_file() and p.stat().st_size and p.suffix in ("", ".pin", ".auth", ".password")
    ]
    secrets = [s for s in secrets if len(s) >= 8]
    assert secrets, "no secrets found to look for"
    for part, url in urls.items():
        base = url.removesuffix("/metrics")
        assert _http(f"{base}/healthz") == (200, b"ok\n"), part
        assert _http(f"{base}/readyz") == (200, b"ready\n"), part
        status, text = _http(url)
        assert status == 200
        for secret in secrets:
            assert secret not in text, f"{part} shows a secret"
        for marker in (b"app/metrics-probe", b"BEGIN", b"PRIVATE", b"pin"):
            assert marker not in text, (part, marker)


def test_a_flood_of_scrapes_leaves_the_broker_serving(stack: KmsStack) -> None:
    url = str(dict(stack.state()["metrics"])["broker"])  # type: ignore[call-overload]

    def scrape(_: int) -> int:
        try:
            return _http(url, 30)[0]
        except OSError:
            return 0  # refused at the door is a possible answer to a flood

    with ThreadPoolExecutor(max_workers=64) as pool:
        statuses = list(pool.map(scrape, range(600)))
    assert statuses.count(200) >= 100, sorted(set(statuses))
    assert set(statuses) <= {0, 200, 503}
    # Still signing, still answering its own health, and still scraped whole.
    with stack.client() as kms:
        assert kms.sign("app/metrics-probe", b"after the flood")
    assert _http(url.removesuffix("/metrics") + "/healthz") == (200, b"ok\n")
    assert b"edgekms_requests_total" in _http(url)[1]
