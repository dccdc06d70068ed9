"""A flood of challenge requests from one address is throttled by the real broker (run
last in the package: the ration it exhausts is the loopback address every test shares)."""

from __future__ import annotations

from pathlib import Path

import grpc

from edgekms import errors
from edgekms.v1 import enroll_pb2
from mgmt.attested_enroll import enrollment_stub
from mgmt.client import error_from_rpc
from mgmt.tpmdevice import DeviceTpm
from tests.attest.conftest import DeviceFactory
from tests.attest.test_attested_enroll import audited, enroll_address, new_token
from tests.e2e.conftest import KmsStack


def test_a_challenge_flood_is_throttled_and_audited(
    stack: KmsStack, device_tpm: DeviceFactory, tmp_path: Path
) -> None:
    tpm = device_tpm()
    token_file, fingerprint = new_token(stack, tmp_path, "flood-1", "--attest")
    with DeviceTpm(tpm.tcti) as device:
        evidence = device.evidence()
    request = enroll_pb2.BeginAttestationRequest(
        token=token_file.read_text().strip(),
        ek_certificate=evidence.ek_certificate_der,
        ek_public=evidence.ek_public,
        ak_public=evidence.ak_public,
    )
    answered, refused = 0, ""
    with enrollment_stub(enroll_address(stack), fingerprint) as stub:
        for _ in range(40):
            try:
                stub.BeginAttestation(request, timeout=30)
                answered += 1
            except grpc.RpcError as exc:
                err = error_from_rpc(exc)
                assert isinstance(err, errors.ResourceExhausted), err
                refused = err.reason
                break
    assert refused == "attest.throttled"
    assert 0 < answered <= 20
    assert audited(stack, "attest.throttled")
