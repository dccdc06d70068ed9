"""bench/peers.py's pure parts and the report's issuance-against-peers rows: the verdict
against step-ca, the side-by-side table, the skipped-peer reasons, step-ca's one-time
tokens and the check of a peer's certificate. The peers themselves (a Go build of step-ca,
cfssl serving) never run in `make test`; `make bench` runs them."""

from __future__ import annotations

import base64
import datetime
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

from bench.issuance import make_csrs
from bench.peers import (
    PeerUnavailable,
    Provisioner,
    check_issued,
    make_pki,
    render,
    strip_cloud_imports,
    tokens_to_premint,
)
from bench.report import peer_targets, peers_table
from bench.stats import RunResult, summarise


def _run(provider: str, inflight: int, rate: float) -> RunResult:
    """A run of `rate` operations per second over 4 s, every one taking 2 ms, the server
    spending 2 ms of CPU on each."""
    count = int(rate * 4)
    cpu = {provider: count * 0.002}
    return summarise("issue", provider, "ec-p256", inflight, [0.002] * count, 4.0, cpu=cpu)


def _results(step_rates: tuple[float, float], skipped: list[dict[str, str]]) -> dict[str, Any]:
    issue = [_run("edgekms", 1, 150.0), _run("edgekms", 16, 400.0)]
    peers = [
        _run("step-ca", 1, step_rates[0]),
        _run("step-ca", 16, step_rates[1]),
        _run("cfssl-sqlite", 1, 300.0),
        _run("cfssl-sqlite", 16, 250.0),
    ]
    return {
        "machine": {"cpus": 2, "loadavg_at_start": [3.5, 3.0, 2.0]},
        "settings": {"duration_s": 4.0, "warmup_s": 1.0},
        "issuance": [r.to_json() for r in issue],
        "peers": {
            "runs": [r.to_json() for r in peers if r.provider not in {s["peer"] for s in skipped}],
            "skipped": skipped,
            "note": "how the peers store",
        },
    }


def test_verdict_is_the_ratio_to_step_ca_at_each_level() -> None:
    issue = [_run("edgekms", 1, 150.0), _run("edgekms", 16, 400.0)]
    peers = [_run("step-ca", 1, 500.0), _run("step-ca", 16, 400.0)]
    rows = peer_targets(issue, peers, {})
    assert [t.name for t in rows] == [
        "issuance at 1 in flight vs step-ca",
        "issuance at 16 in flight vs step-ca",
    ]
    assert rows[0].met is False
    assert rows[0].measured.startswith("0.30x (150 vs 500/s)")
    assert rows[1].met is True  # equal is enough: >= 1.0 x step-ca
    assert rows[1].measured.startswith("1.00x")


def test_verdict_not_measured_when_step_ca_was_skipped() -> None:
    issue = [_run("edgekms", 1, 150.0), _run("edgekms", 16, 400.0)]
    rows = peer_targets(issue, [], {"step-ca": "no Go toolchain"})
    assert [t.met for t in rows] == [None, None]
    assert all("no Go toolchain" in t.measured for t in rows)


def test_side_by_side_table_has_every_peer_per_level() -> None:
    issue = [_run("edgekms", 1, 150.0), _run("edgekms", 16, 400.0)]
    peers = [_run("step-ca", 1, 500.0), _run("cfssl-sqlite", 16, 250.0)]
    lines = peers_table(issue, peers).splitlines()
    assert lines[0].startswith("| in flight | EdgeKMS | step-ca (badger) | cfssl + SQLite |")
    assert lines[2].split(" | ")[1:] == [
        "150/s (p50 2.00, p99 2.0 ms)",
        "500/s (p50 2.00, p99 2.0 ms)",
        "n/a",
        "0.30 |",
    ]
    assert "n/a" in lines[3].split(" | ")[2]  # no step-ca at 16: no ratio either
    assert lines[3].endswith("| n/a |")


def test_render_shows_verdicts_table_and_skip_reasons() -> None:
    text = render(_results((100.0, 500.0), []))
    assert (
        "| issuance at 1 in flight vs step-ca | ≥ 1.0 x step-ca | 1.50x (150 vs 100/s) | met |"
        in text
    )
    assert (
        "| issuance at 16 in flight vs step-ca | ≥ 1.0 x step-ca "
        "| 0.80x (400 vs 500/s) | **missed** |" in text
    )
    assert "how the peers store" in text
    assert "load average 3.5" in text
    # where the cores went: CPU ms per certificate (2 s of 1,000 certificates = 2 ms)
    assert "- step-ca at 16 in flight: step-ca 2.00 ms" in text
    skipped = render(_results((100.0, 500.0), [{"peer": "step-ca", "reason": "go build failed"}]))
    assert "- step-ca skipped: go build failed" in skipped
    assert "| not measured |" in skipped


def test_cloud_back_ends_are_the_only_imports_dropped() -> None:
    main_go = (
        "import (\n"
        '\t"github.com/smallstep/certificates/commands"\n'
        '\t_ "github.com/smallstep/certificates/kms/azurekms"\n'
        '\t_ "github.com/smallstep/certificates/kms/cloudkms"\n'
        '\t_ "github.com/smallstep/certificates/kms/softkms"\n'
        '\t_ "github.com/smallstep/certificates/cas/cloudcas"\n'
        '\t_ "github.com/smallstep/certificates/cas/vaultcas"\n'
        '\t_ "github.com/smallstep/certificates/cas/softcas"\n'
        ")\n"
    )
    kept = strip_cloud_imports(main_go)
    assert "azurekms" not in kept and "cloudkms" not in kept
    assert "cloudcas" not in kept and "vaultcas" not in kept
    assert "kms/softkms" in kept and "cas/softcas" in kept and "certificates/commands" in kept


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_one_time_token_is_an_es256_jwt_step_ca_can_check() -> None:
    provisioner = Provisioner("bench@test")
    token = provisioner.token("https://127.0.0.1:1/1.0/sign", "h.lan", ["h.lan"], 1_700_000_000)
    head, body, signature = token.split(".")
    header = json.loads(_unb64(head))
    claims = json.loads(_unb64(body))
    assert header == {"alg": "ES256", "kid": provisioner.kid, "typ": "JWT"}
    assert claims["iss"] == "bench@test" and claims["sub"] == "h.lan"
    assert claims["sans"] == ["h.lan"] and claims["aud"].endswith("/1.0/sign")
    assert claims["exp"] - claims["nbf"] == 300
    raw = _unb64(signature)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    provisioner.key.public_key().verify(
        der, f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256())
    )  # raises if wrong
    again = provisioner.token("a", "h.lan", ["h.lan"], 1_700_000_000)
    assert json.loads(_unb64(again.split(".")[1]))["jti"] != claims["jti"]  # one-time
    reloaded = Provisioner("bench@test", provisioner.private_pem())
    assert reloaded.public_jwk() == provisioner.public_jwk()


def _leaf(pki_dir: Path, csr_pem: bytes, signer_key: ec.EllipticCurvePrivateKey) -> bytes:
    """What a peer would answer: the CSR's key and names, issued under the intermediate."""
    inter = x509.load_pem_x509_certificate((pki_dir / "intermediate_ca.crt").read_bytes())
    csr = x509.load_pem_x509_csr(csr_pem)
    now = datetime.datetime.now(datetime.UTC)
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
        .issuer_name(inter.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(san, critical=False)
        .sign(signer_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_check_issued_accepts_the_real_thing_and_refuses_a_forgery(tmp_path: Path) -> None:
    pki = make_pki(tmp_path, "test")
    assert pki.int_key.stat().st_mode & 0o077 == 0  # the CA key is not world-readable
    key = serialization.load_pem_private_key(pki.int_key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    csr, other = make_csrs(2)
    check_issued(_leaf(tmp_path, csr, key), csr, pki)
    with pytest.raises(PeerUnavailable, match="not signed by the intermediate"):
        check_issued(_leaf(tmp_path, csr, ec.generate_private_key(ec.SECP256R1())), csr, pki)
    with pytest.raises(PeerUnavailable, match="CSR's key"):
        check_issued(_leaf(tmp_path, other, key), csr, pki)


def test_premint_pool_is_bounded() -> None:
    assert tokens_to_premint(4.0, 1.0) == 12_500
    assert tokens_to_premint(3600.0, 1.0) == 20_000  # a long window mints the rest on demand
