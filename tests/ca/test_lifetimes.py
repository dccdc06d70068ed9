"""Short-lived certificates: lifetimes in minutes and hours, per-profile defaults and
maxima, the https-server default of 90 days. Pure logic with software keys, then one
issuance over NATS from the token checked with openssl."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_service.builder import CaUrls, build_leaf, random_serial
from ca_service.policy import load_csr, plan_from_csr
from ca_service.profiles import BUILTIN_PROFILES, parse_profiles
from edgekms.durations import format_ttl, parse_ttl
from edgekms.errors import InvalidArgument
from edgekms.v1 import ca_pb2
from tests.ca.conftest import CAEnv, write
from tests.ca.helpers import SoftCA, make_csr, make_key, make_soft_ca
from tests.ca.lint import pkilint_findings
from tests.ca.test_service import run

HOUR = datetime.timedelta(hours=1)


@pytest.fixture(scope="module")
def soft() -> SoftCA:
    return make_soft_ca()


def _csr() -> x509.CertificateSigningRequest:
    return load_csr(make_csr(make_key("ec-p256"), sans=("dns:nas.example.com",)))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", datetime.timedelta(minutes=30)),
        ("1h", HOUR),
        ("36h", 36 * HOUR),
        ("90d", datetime.timedelta(days=90)),
        ("4w", datetime.timedelta(weeks=4)),
        (" 5M ", datetime.timedelta(minutes=5)),
    ],
)
def test_ttl_spellings(text: str, expected: datetime.timedelta) -> None:
    assert parse_ttl(text) == expected
    assert parse_ttl(format_ttl(expected)) == expected


@pytest.mark.parametrize("text", ["", "1", "1s", "4m", "1h30m", "-1h", "1.5h", "3651d", "x"])
def test_bad_ttl_is_typed(text: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        parse_ttl(text)
    assert exc.value.reason == "cert.ttl_invalid"


def test_https_server_defaults_to_90_days_and_allows_at_most_398() -> None:
    profile = BUILTIN_PROFILES["https-server"]
    assert profile.default_validity == datetime.timedelta(days=90)
    assert profile.max_validity == datetime.timedelta(days=398)
    assert plan_from_csr(profile, _csr()).validity == datetime.timedelta(days=90)


@pytest.mark.parametrize("ttl", ["5m", "30m", "1h", "12h"])
def test_short_leaf_lives_exactly_its_ttl_and_lints_clean(
    soft: SoftCA, ttl: str, tmp_path: Path
) -> None:
    lifetime = parse_ttl(ttl)
    plan = plan_from_csr(
        BUILTIN_PROFILES["https-server"], _csr(), validity_seconds=int(lifetime.total_seconds())
    )
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    cert = build_leaf(
        soft.key, soft.cert, plan, random_serial(), CaUrls.from_base("http://ca.example.com")
    )
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == lifetime
    # Backdated for lagging clocks, but a short lifetime keeps most of itself.
    assert cert.not_valid_before_utc <= before
    assert cert.not_valid_after_utc - before >= lifetime * 5 / 6 - datetime.timedelta(seconds=1)
    der = cert.public_bytes(serialization.Encoding.DER)
    assert pkilint_findings("cert", der, tmp_path) == []


@pytest.mark.parametrize(
    ("days", "seconds", "reason"),
    [
        pytest.param(0, 60, "cert.ttl_invalid", id="under_5_minutes"),
        pytest.param(0, 399 * 86400, "cert.validity_exceeds_profile", id="seconds_over_max"),
        pytest.param(399, 0, "cert.validity_exceeds_profile", id="days_over_max"),
        pytest.param(1, 3600, "cert.ttl_conflict", id="days_and_seconds"),
    ],
)
def test_lifetime_refusals(days: int, seconds: int, reason: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        plan_from_csr(BUILTIN_PROFILES["https-server"], _csr(), days, seconds)
    assert exc.value.reason == reason


def test_profile_ttls_in_toml() -> None:
    profiles = parse_profiles(
        """
[profiles.short-web]
extends = "https-server"
max_ttl = "12h"
default_ttl = "1h"

[profiles.kiosk]
extends = "device"
max_validity_days = 30
"""
    )
    short = profiles["short-web"]
    assert (short.default_validity, short.max_validity) == (HOUR, 12 * HOUR)
    assert short.max_validity_days == 0  # shown as whole days
    assert plan_from_csr(short, _csr()).validity == HOUR
    assert plan_from_csr(short, _csr(), validity_seconds=6 * 3600).validity == 6 * HOUR
    with pytest.raises(InvalidArgument) as exc:
        plan_from_csr(short, _csr(), 2)
    assert exc.value.reason == "cert.validity_exceeds_profile"
    assert exc.value.details["max_seconds"] == str(12 * 3600)
    # A default that is not given is min(max, the base's default).
    assert profiles["kiosk"].default_validity == datetime.timedelta(days=30)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(
            "[profiles.x]\nextends='device'\nmax_ttl='1h'\nmax_validity_days=1", id="both"
        ),
        pytest.param("[profiles.x]\nextends='device'\nmax_ttl='1 hour'", id="unparsable"),
        pytest.param("[profiles.x]\nextends='device'\nmax_ttl=3600", id="not_a_string"),
        pytest.param("[profiles.x]\nextends='device'\nmax_ttl='1m'", id="under_5_minutes"),
        pytest.param(
            "[profiles.x]\nextends='device'\nmax_ttl='1h'\ndefault_ttl='2h'",
            id="default_over_max",
        ),
    ],
)
def test_bad_profile_ttls(text: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        parse_profiles(text)
    assert exc.value.reason == "profile.invalid"


async def test_one_hour_certificate_from_the_token(ca_env: CAEnv, tmp_path: Path) -> None:
    """Over NATS as the broker asks, signed in SoftHSM, accepted by openssl; the same
    request past the profile's maximum is refused with nothing stored."""
    init = await ca_env.init()
    response = await ca_env.call(
        "IssueCertificate",
        ca_pb2.IssueCertificateRequest(
            profile="https-server",
            csr=make_csr(make_key("ec-p256"), sans=("dns:nas.example.com",)),
            validity_seconds=3600,
            requester="admin",
        ),
        ca_pb2.IssueCertificateResponse,
    )
    leaf = x509.load_der_x509_certificate(response.certificate_der)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == HOUR
    assert response.record.not_after == leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")

    def pem(der: bytes) -> bytes:
        return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)

    root = write(tmp_path / "root.pem", pem(init.root_certificate_der))
    inter = write(tmp_path / "inter.pem", pem(init.intermediate_certificate_der))
    leaf_pem = write(tmp_path / "leaf.pem", pem(response.certificate_der))
    done = await run(
        "openssl", "verify", "-CAfile", str(root), "-untrusted", str(inter), str(leaf_pem)
    )
    assert done.returncode == 0 and ": OK" in done.stdout, done.stdout + done.stderr

    before = await ca_env.record_count()
    with pytest.raises(InvalidArgument) as exc:
        await ca_env.call(
            "IssueCertificate",
            ca_pb2.IssueCertificateRequest(
                profile="https-server",
                csr=make_csr(make_key("ec-p256"), sans=("dns:nas.example.com",)),
                validity_seconds=399 * 86400,
                requester="admin",
            ),
            ca_pb2.IssueCertificateResponse,
        )
    assert exc.value.reason == "cert.validity_exceeds_profile"
    assert await ca_env.record_count() == before

    profiles = await ca_env.call(
        "ListProfiles", ca_pb2.ListProfilesRequest(), ca_pb2.ListProfilesResponse
    )
    https = next(p for p in profiles.profiles if p.name == "https-server")
    assert (https.default_validity_seconds, https.max_validity_seconds) == (
        90 * 86400,
        398 * 86400,
    )
