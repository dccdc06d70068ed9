"""edgekms.tpmcred against a real swtpm: the software TPM2_MakeCredential is activated by
the TPM holding the EK (RSA and ECC EKs), only with the AK it names loaded, and never by
another TPM; the EK and AK checks refuse keys that are not one."""

from __future__ import annotations

import os

import pytest

from edgekms import errors, tpmcred
from mgmt.tpmdevice import DeviceTpm
from tests.tpm.swtpm_fixtures import SwtpmFactory, swtpm_factory

__all__ = ["swtpm_factory"]


@pytest.mark.parametrize("template", ["EK-RSA2048", "EK-ECC256"])
def test_a_credential_made_in_software_is_activated_by_its_tpm_only(
    swtpm_factory: SwtpmFactory, template: str
) -> None:
    mine, other = swtpm_factory(), swtpm_factory()
    secret = os.urandom(32)
    with DeviceTpm(mine.tcti, ek_template=template) as tpm:
        evidence = tpm.evidence()
        ek = tpmcred.parse_public(evidence.ek_public)
        ak = tpmcred.parse_public(evidence.ak_public)
        tpmcred.check_ek(ek)
        tpmcred.check_ak(ak)
        blob, encrypted = tpmcred.make_credential(ek, secret, ak.name)
        assert tpm.activate(blob, encrypted) == secret
        # Bound to the AK's name: the same EK with another name's credential fails.
        wrong_name = ak.name[:-1] + bytes([ak.name[-1] ^ 1])
        blob2, encrypted2 = tpmcred.make_credential(ek, secret, wrong_name)
        with pytest.raises(errors.FailedPrecondition) as bound:
            tpm.activate(blob2, encrypted2)
        assert bound.value.reason == "attest.activation_failed"
    with DeviceTpm(other.tcti, ek_template=template) as thief:
        with pytest.raises(errors.FailedPrecondition) as stolen:
            thief.activate(blob, encrypted)
        assert stolen.value.reason == "attest.activation_failed"


def test_an_ek_is_not_an_ak_and_a_device_key_is_not_an_ek(swtpm_factory: SwtpmFactory) -> None:
    with DeviceTpm(swtpm_factory().tcti) as tpm:
        evidence = tpm.evidence()
        key = tpm.create_key()
    ek = tpmcred.parse_public(evidence.ek_public)
    with pytest.raises(errors.FailedPrecondition) as not_ak:
        tpmcred.check_ak(ek)
    assert not_ak.value.reason == "attest.ak_invalid"
    unrestricted = tpmcred.parse_public(key.public)
    with pytest.raises(errors.FailedPrecondition) as not_ak2:
        tpmcred.check_ak(unrestricted)
    assert not_ak2.value.reason == "attest.ak_invalid"
    with pytest.raises(errors.FailedPrecondition) as not_ek:
        tpmcred.check_ek(unrestricted)
    assert not_ek.value.reason == "attest.ek_invalid"


def test_a_certification_of_another_key_or_a_forged_one_is_refused(
    swtpm_factory: SwtpmFactory,
) -> None:
    nonce = os.urandom(32)
    with DeviceTpm(swtpm_factory().tcti) as tpm:
        ak = tpmcred.parse_public(tpm.evidence().ak_public)
        key, other = tpm.create_key(), tpm.create_key()
        info, signature = tpm.certify(key, nonce)
    assert tpmcred.verify_certify(ak, info, signature, key.public, nonce).name
    with pytest.raises(errors.FailedPrecondition) as swapped:
        tpmcred.verify_certify(ak, info, signature, other.public, nonce)
    assert swapped.value.reason == "attest.name_mismatch"
    forged = info[:-1] + bytes([info[-1] ^ 1])
    with pytest.raises(errors.FailedPrecondition) as bad:
        tpmcred.verify_certify(ak, forged, signature, key.public, nonce)
    assert bad.value.reason == "attest.bad_signature"
    with pytest.raises(errors.FailedPrecondition) as stale:
        tpmcred.verify_certify(ak, info, signature, key.public, os.urandom(32))
    assert stale.value.reason == "attest.nonce_mismatch"
