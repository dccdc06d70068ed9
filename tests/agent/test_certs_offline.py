"""What a certificate pass decides from the files alone, before any KMS is asked
(agent.certs.keep_cert on a temporary directory; a software CA signs the leaf)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from agent.certs import keep_cert
from agent.config import CertItem
from edgekms.errors import InvalidArgument
from mgmt import bundle
from mgmt.client import KMSClient
from tests.ca.helpers import make_soft_ca
from tests.ca.test_bundles import soft_leaf


def no_kms() -> KMSClient:
    raise AssertionError("the pass asked the KMS although nothing was due")


def item(tmp_path: Path) -> CertItem:
    return CertItem(
        name="vpn", profile="vpn-server", common_name="vpn.home.arpa",
        sans=("dns:vpn.home.arpa",), cert=tmp_path / "vpn.crt", key=tmp_path / "vpn.key",
    )  # fmt: skip


def test_a_key_file_that_is_no_key_is_refused_and_kept(tmp_path: Path) -> None:
    wanted = item(tmp_path)
    wanted.key.write_bytes(b"not a key, maybe someone's TPM handle\n")
    with pytest.raises(InvalidArgument) as caught:
        keep_cert(wanted, no_kms, time.time())
    assert caught.value.reason == "agent.key_invalid"
    assert wanted.key.read_bytes() == b"not a key, maybe someone's TPM handle\n"
    assert not wanted.cert.exists()


def test_a_valid_certificate_not_yet_due_needs_no_kms(tmp_path: Path) -> None:
    wanted = item(tmp_path)
    key, der = soft_leaf(make_soft_ca(), "vpn-server", ("dns:vpn.home.arpa",), "vpn.home.arpa")
    wanted.key.write_bytes(bundle.key_pem(key))
    wanted.key.chmod(0o644)  # loosened by hand: put back
    wanted.cert.write_bytes(bundle.pem_bundle(der, []))
    outcome = keep_cert(wanted, no_kms, time.time())
    assert outcome.action == "unchanged" and outcome.due > time.time()
    assert wanted.key.stat().st_mode & 0o777 == 0o600
    assert wanted.cert.read_bytes() == bundle.pem_bundle(der, [])
    assert key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ) in bundle.load_leaf_key(wanted.key.read_bytes()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
