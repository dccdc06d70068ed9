"""The checks a fetched CRL passes before the agent writes it (agent.crl.check_crls,
pure): CRLs signed in software by a test CA, as the mini-CA signs them in the token."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.config import CrlItem
from agent.crl import check_crls
from ca_service.crl import build_crl
from edgekms.errors import FailedPrecondition
from tests.ca.helpers import SoftCA, make_soft_ca

NOW = datetime.datetime(2026, 12, 2, 12, 0, tzinfo=datetime.UTC)
ITEM = CrlItem(name="vpn-crl", path=Path("/etc/openvpn/crl.pem"))


def crl(ca: SoftCA, number: int, minutes: int = 60) -> x509.CertificateRevocationList:
    return build_crl(
        ca.key, ca.cert, [], number, now=NOW, validity=datetime.timedelta(minutes=minutes)
    )


def pem(*crls: x509.CertificateRevocationList) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls)


@pytest.fixture(scope="module")
def ca() -> SoftCA:
    return make_soft_ca()


def test_a_good_crl_becomes_the_file(ca: SoftCA) -> None:
    fresh = crl(ca, 5)
    data = check_crls(ITEM, [fresh], [ca.cert], pem(crl(ca, 4)), NOW.timestamp())
    assert data == pem(fresh)
    der_item = CrlItem(name="d", path=Path("/x.crl"), format="der")
    assert check_crls(der_item, [fresh], [ca.cert], None, NOW.timestamp()) == (
        fresh.public_bytes(serialization.Encoding.DER)
    )


def test_an_older_crl_number_is_a_rollback(ca: SoftCA) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        check_crls(ITEM, [crl(ca, 3)], [ca.cert], pem(crl(ca, 9)), NOW.timestamp())
    assert caught.value.reason == "agent.crl_rollback"


def test_a_crl_signed_by_another_key_is_refused(ca: SoftCA) -> None:
    other = make_soft_ca()
    forged = build_crl(other.key, ca.cert, [], 10, now=NOW)  # our CA's name, their key
    with pytest.raises(FailedPrecondition) as caught:
        check_crls(ITEM, [forged], [ca.cert], None, NOW.timestamp())
    assert caught.value.reason == "agent.crl_bad_signature"


def test_a_crl_of_an_unknown_issuer_is_refused(ca: SoftCA) -> None:
    other = make_soft_ca()
    with pytest.raises(FailedPrecondition) as caught:
        check_crls(ITEM, [crl(other, 1)], [ca.cert], None, NOW.timestamp())
    assert caught.value.reason == "agent.crl_bad_signature"


def test_an_expired_crl_is_refused(ca: SoftCA) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        check_crls(ITEM, [crl(ca, 11, minutes=1)], [ca.cert], None, NOW.timestamp() + 120)
    assert caught.value.reason == "agent.crl_expired"
