"""TPM-attested enrollment against the real stack (`kmsctl up --ek-ca`) with a real swtpm
per device: the EK certificate chains to a manufacturer CA (or the EK is registered on
the token), TPM2_ActivateCredential answers the broker's one-time nonce, and the device
key, made in the TPM and certified by the AK over that nonce, gets the certificate; the
device registry records the EK's SHA-256. Every attack is refused with a typed error,
audited, and enrolls nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edgekms import errors, tpmcred
from edgekms.v1 import enroll_pb2
from mgmt.attested_enroll import enrollment_stub
from mgmt.cli import cli
from mgmt.client import error_from_rpc
from mgmt.swtpm import Swtpm
from mgmt.tpmdevice import DeviceKey, DeviceTpm
from tests.attest.conftest import DeviceFactory, Manufacturer
from tests.e2e.conftest import KmsStack
from tests.enroll.conftest import run, run_json


def enroll_address(stack: KmsStack) -> str:
    return str(stack.state()["enroll"])


def new_token(stack: KmsStack, tmp: Path, name: str, *extra: str) -> tuple[Path, str]:
    path = tmp / f"{name}.token"
    made = run_json(stack, "enroll", "token", "create", name, "--token-out", str(path), *extra)
    return path, made["fingerprint"]


def device_enroll(stack: KmsStack, tpm: Swtpm, token: Path, fingerprint: str, out: Path) -> Result:
    return CliRunner().invoke(
        cli,
        [
            "enroll",
            "--attest",
            "--tpm-tcti",
            tpm.tcti,
            "--server",
            enroll_address(stack),
            "--token",
            str(token),
            "--fingerprint",
            fingerprint,
            "--out-dir",
            str(out),
            "-o",
            "json",
        ],
    )


def refusal(result: Result) -> str:
    """The typed error's reason of a refused kmsctl run."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit | errors.KMSError), result.output
    return result.output


def ek_sha256_of(tpm: Swtpm) -> str:
    with DeviceTpm(tpm.tcti) as device:
        evidence = device.evidence()
    return tpmcred.ek_identity(tpmcred.parse_public(evidence.ek_public).public_key_der).hex()


def audited(stack: KmsStack, reason: str) -> bool:
    tail = run(stack, "audit", "tail", "-n", "500", "-o", "json")
    assert tail.exit_code == 0, tail.output
    return reason in tail.stdout


def call(fn: Any, request: Any) -> Any:
    try:
        return fn(request, timeout=30)
    except grpc.RpcError as exc:
        raise error_from_rpc(exc) from None


def test_a_device_with_a_manufacturer_ek_certificate_enrolls_with_its_tpm_key(
    stack: KmsStack, device_tpm: DeviceFactory, tmp_path: Path
) -> None:
    tpm = device_tpm()
    token, fingerprint = new_token(stack, tmp_path, "router-1", "--attest")
    result = device_enroll(stack, tpm, token, fingerprint, tmp_path / "out")
    assert result.exit_code == 0, result.output
    done = json.loads(result.stdout)
    assert done["name"] == "router-1"
    assert done["ek_sha256"] == ek_sha256_of(tpm)
    # The certificate is for the key in the TPM; the key file is a TPM-wrapped blob
    # (0600) and holds no private key in the clear.
    key_file = tmp_path / "out" / "device.tss2.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert key_file.read_bytes().startswith(b"-----BEGIN TSS2 PRIVATE KEY-----")
    blob = DeviceKey.from_file(key_file)
    cert = x509.load_pem_x509_certificate((tmp_path / "out" / "device.crt").read_bytes())
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert cert.public_key().public_bytes(*spki) == tpmcred.parse_public(blob.public).public_key_der
    with pytest.raises(ValueError):  # nothing a software library could load as a key
        serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    config = (tmp_path / "out" / "config.toml").read_text()
    assert 'key_store = "tpm"' in config and 'key = "device.tss2.pem"' in config
    assert done["config"] == str(tmp_path / "out" / "config.toml")
    shown = run_json(stack, "device", "show", "router-1")
    assert shown["ek_sha256"] == done["ek_sha256"]
    assert audited(stack, "BeginAttestation")


def test_a_registered_ek_enrolls_without_a_certificate_and_no_other_tpm_may(
    stack: KmsStack, device_tpm: DeviceFactory, tmp_path: Path
) -> None:
    mine = device_tpm(ek_cert=False)
    other = device_tpm()
    ek_pem = tmp_path / "ek.pem"
    shown = CliRunner().invoke(
        cli, ["tpm", "ek", "--tpm", mine.tcti, "--out", str(ek_pem), "-o", "json"]
    )
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["ek_certificate"] is False
    token, fingerprint = new_token(stack, tmp_path, "nas-1", "--ek", str(ek_pem))
    # Another TPM, even one with a trusted certificate, cannot redeem it.
    stolen = device_enroll(stack, other, token, fingerprint, tmp_path / "other")
    assert "attest.ek_unknown" in refusal(stolen)
    assert not (tmp_path / "other" / "device.crt").exists()
    result = device_enroll(stack, mine, token, fingerprint, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ek_sha256"] == json.loads(shown.stdout)["ek_sha256"]


def test_untrusted_or_unknown_eks_are_refused_and_audited(
    stack: KmsStack, device_tpm: DeviceFactory, other_maker: Manufacturer, tmp_path: Path
) -> None:
    foreign = device_tpm(maker=other_maker)
    token, fingerprint = new_token(stack, tmp_path, "cam-1", "--attest")
    refused = device_enroll(stack, foreign, token, fingerprint, tmp_path / "a")
    assert "attest.ek_untrusted" in refusal(refused)
    bare = device_tpm(ek_cert=False)
    refused = device_enroll(stack, bare, token, fingerprint, tmp_path / "b")
    assert "attest.ek_unknown" in refusal(refused)
    assert audited(stack, "attest.ek_untrusted") and audited(stack, "attest.ek_unknown")
    # Nothing was spent: the right TPM still enrolls with the token.
    good = device_tpm()
    assert device_enroll(stack, good, token, fingerprint, tmp_path / "c").exit_code == 0


def test_an_attest_token_refuses_a_plain_csr(stack: KmsStack, tmp_path: Path) -> None:
    token, fingerprint = new_token(stack, tmp_path, "strict-1", "--attest")
    result = CliRunner().invoke(
        cli,
        [
            "enroll",
            "--server",
            enroll_address(stack),
            "--token",
            str(token),
            "--fingerprint",
            fingerprint,
            "--out-dir",
            str(tmp_path / "out"),
        ],
    )
    assert "enroll.attestation_required" in refusal(result)


def _begin(
    stack: KmsStack, fingerprint: str, token: str, tpm: DeviceTpm
) -> tuple[Any, enroll_pb2.AttestationChallenge]:
    evidence = tpm.evidence()
    ak_public = evidence.ak_public
    with enrollment_stub(enroll_address(stack), fingerprint) as stub:
        challenge = call(
            stub.BeginAttestation,
            enroll_pb2.BeginAttestationRequest(
                token=token,
                ek_certificate=evidence.ek_certificate_der,
                ek_public=evidence.ek_public,
                ak_public=ak_public,
            ),
        )
    return evidence, challenge


def _finish(
    stack: KmsStack,
    fingerprint: str,
    token: str,
    challenge_id: str,
    nonce: bytes,
    key: DeviceKey,
    certify: tuple[bytes, bytes],
) -> Any:
    with enrollment_stub(enroll_address(stack), fingerprint) as stub:
        return call(
            stub.Enroll,
            enroll_pb2.EnrollRequest(
                token=token,
                request_id=os.urandom(8).hex(),
                challenge_id=challenge_id,
                activated_nonce=nonce,
                key_public=key.public,
                certify_info=certify[0],
                certify_signature=certify[1],
            ),
        )


def test_wrong_nonce_replayed_challenge_and_foreign_ak_are_refused(
    stack: KmsStack, device_tpm: DeviceFactory, tmp_path: Path
) -> None:
    tpm_a, tpm_b = device_tpm(), device_tpm()
    token_file, fingerprint = new_token(stack, tmp_path, "robot-1", "--attest")
    token = token_file.read_text().strip()
    with DeviceTpm(tpm_a.tcti) as a:
        _, challenge = _begin(stack, fingerprint, token, a)
        nonce = a.activate(challenge.credential_blob, challenge.encrypted_secret)
        key = a.create_key()
        # A guessed nonce: refused, and the challenge is gone with it.
        wrong = os.urandom(32)
        with pytest.raises(errors.FailedPrecondition) as bad:
            _finish(
                stack, fingerprint, token, challenge.challenge_id, wrong, key, a.certify(key, wrong)
            )
        assert bad.value.reason == "attest.nonce_mismatch"
        with pytest.raises(errors.FailedPrecondition) as replay:
            _finish(
                stack, fingerprint, token, challenge.challenge_id, nonce, key, a.certify(key, nonce)
            )
        assert replay.value.reason == "attest.challenge_unknown"
        # A certification over another nonce than the challenge's.
        _, second = _begin(stack, fingerprint, token, a)
        nonce2 = a.activate(second.credential_blob, second.encrypted_secret)
        with pytest.raises(errors.FailedPrecondition) as stale:
            _finish(
                stack, fingerprint, token, second.challenge_id, nonce2, key, a.certify(key, nonce)
            )
        assert stale.value.reason == "attest.nonce_mismatch"
    # A's EK certificate with B's AK: the credential is bound to B's AK name, so A's TPM
    # cannot activate it, and B's TPM has not A's EK: nobody can answer.
    with DeviceTpm(tpm_b.tcti) as b:
        ak_b = b.evidence().ak_public
    with DeviceTpm(tpm_a.tcti) as a:
        evidence = a.evidence()
        with enrollment_stub(enroll_address(stack), fingerprint) as stub:
            crossed = call(
                stub.BeginAttestation,
                enroll_pb2.BeginAttestationRequest(
                    token=token,
                    ek_certificate=evidence.ek_certificate_der,
                    ek_public=evidence.ek_public,
                    ak_public=ak_b,
                ),
            )
        if tpmcred.parse_public(ak_b).name != tpmcred.parse_public(evidence.ak_public).name:
            with pytest.raises(errors.FailedPrecondition) as cannot:
                a.activate(crossed.credential_blob, crossed.encrypted_secret)
            assert cannot.value.reason == "attest.activation_failed"
    with DeviceTpm(tpm_b.tcti) as b:
        with pytest.raises(errors.FailedPrecondition) as cannot:
            b.activate(crossed.credential_blob, crossed.encrypted_secret)
        assert cannot.value.reason == "attest.activation_failed"
    assert audited(stack, "attest.nonce_mismatch")
    assert audited(stack, "attest.challenge_unknown")
    listed = run_json(stack, "device", "list")
    assert "robot-1" not in {d["name"] for d in listed}


def test_a_denied_devices_tpm_cannot_enroll_again_under_any_name(
    stack: KmsStack, device_tpm: DeviceFactory, tmp_path: Path
) -> None:
    tpm = device_tpm()
    token, fingerprint = new_token(stack, tmp_path, "kiosk-1", "--attest")
    assert device_enroll(stack, tpm, token, fingerprint, tmp_path / "a").exit_code == 0
    # Not denied: the same TPM is still one device only.
    token2, _ = new_token(stack, tmp_path, "kiosk-2", "--attest")
    assert "attest.ek_in_use" in refusal(
        device_enroll(stack, tpm, token2, fingerprint, tmp_path / "b")
    )
    denied = run(stack, "device", "deny", "kiosk-1")
    assert denied.exit_code == 0, denied.output
    token3, _ = new_token(stack, tmp_path, "kiosk-3", "--attest")
    assert "enroll.denied" in refusal(
        device_enroll(stack, tpm, token3, fingerprint, tmp_path / "c")
    )
    assert audited(stack, "enroll.denied")


def test_pcr_values_that_are_not_the_quoted_ones_are_refused(
    stack: KmsStack, device_tpm: DeviceFactory, tmp_path: Path
) -> None:
    tpm = device_tpm()
    token_file, fingerprint = new_token(stack, tmp_path, "pcr-liar", "--attest")
    token = token_file.read_text().strip()
    with DeviceTpm(tpm.tcti) as device:
        _, challenge = _begin(stack, fingerprint, token, device)
        nonce = device.activate(challenge.credential_blob, challenge.encrypted_secret)
        key = device.create_key()
        info, signature = device.certify(key, nonce)
        quote, quote_signature = device.quote(list(range(8)), nonce)
        values = device.pcr_values(list(range(8)))
    values[7] = b"\x01" * 32  # claims a PCR 7 it did not have
    with (
        enrollment_stub(enroll_address(stack), fingerprint) as stub,
        pytest.raises(errors.FailedPrecondition) as lied,
    ):
        call(
            stub.Enroll,
            enroll_pb2.EnrollRequest(
                token=token,
                request_id=os.urandom(8).hex(),
                challenge_id=challenge.challenge_id,
                activated_nonce=nonce,
                key_public=key.public,
                certify_info=info,
                certify_signature=signature,
                pcr_quote=quote,
                pcr_quote_signature=quote_signature,
                pcr_values=values,
            ),
        )
    assert lied.value.reason == "attest.pcr_values"
    assert "pcr-liar" not in {d["name"] for d in run_json(stack, "device", "list")}
