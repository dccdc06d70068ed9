"""A device enrolls itself proven by its TPM (`kmsctl enroll --attest`).

1. First contact pins the internal CA by fingerprint, as plain enrollment does
   (mgmt.enroll.pinned_ca); nothing travels before that.
2. BeginAttestation: the token, the EK certificate from NV (or none, for a token that
   registers the EK), the EK's and the AK's public areas. The broker checks the token,
   the EK (manufacturer chain or registration, not denied, not another device's) and the
   AK, and answers TPM2_MakeCredential of a fresh nonce to that EK for that AK.
3. TPM2_ActivateCredential recovers the nonce: only this TPM can (its EK), and only
   with that AK loaded in it.
4. A device key is made in the TPM (fixedTPM: it never leaves), the AK certifies it over
   the nonce (TPM2_Certify), and Enroll sends the nonce, the key's public area and the
   certification. The broker issues the client certificate for that key and records the
   EK's SHA-256 as the device's identity, with its AK.

Written to the out dir: device.tss2.pem (the TPM-wrapped key as a `TSS2 PRIVATE KEY`
PEM, 0600: useless outside this TPM), device.crt, ca.crt, config.toml (`key_store =
"tpm"`: the device is a client of the KMS with the certified key, mutual TLS through
edgekms.keytunnel, as after `kmsctl enroll --tpm`) and device.json (name, EK identity,
enrollment address and fingerprint: what `kmsctl unlock fetch` reads).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization

from edgekms.errors import InvalidArgument
from edgekms.keytunnel import DEFAULT_TCTI
from edgekms.v1 import enroll_pb2, enroll_pb2_grpc
from mgmt.client import error_from_rpc, new_request_id
from mgmt.devicekey import TPM_KEY_FILE
from mgmt.enroll import (
    CA_FILE,
    CERT_FILE,
    CONFIG_FILE,
    _server_name,
    normalize_fingerprint,
    pinned_ca,
    split_server,
)
from mgmt.pki import write_client_config, write_private, write_public
from mgmt.tpmdevice import DeviceTpm

ENROLL_PCRS = list(range(8))  # the firmware and boot loader PCRs of the PC Client profile
DEVICE_FILE = "device.json"


@contextlib.contextmanager
def enrollment_stub(
    server: str, fingerprint: str
) -> Iterator[enroll_pb2_grpc.EnrollmentServiceStub]:
    """A stub on the enrollment listener, over TLS trusting only the pinned CA."""
    host, port = split_server(server)
    ca, leaf = pinned_ca(host, port, normalize_fingerprint(fingerprint))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.public_bytes(serialization.Encoding.PEM)
    )
    name = _server_name(leaf)
    options = [("grpc.ssl_target_name_override", name)] if name else []
    with grpc.secure_channel(f"{host}:{port}", credentials, options=options) as channel:
        yield enroll_pb2_grpc.EnrollmentServiceStub(channel)


@dataclass(frozen=True)
class AttestedEnrollment:
    response: enroll_pb2.EnrollResponse
    ek_sha256: str
    config: Path
    files: list[Path]


def attested_enroll(
    server: str,
    token: str,
    fingerprint: str,
    out_dir: Path,
    tcti: str | None,
    *,
    endorsement_auth: bytes = b"",
    timeout: float = 30.0,
) -> AttestedEnrollment:
    """The whole flow of the module docstring; KMSError on any refusal."""
    host, _ = split_server(server)
    key_path = out_dir / TPM_KEY_FILE
    for existing in (key_path, out_dir / CONFIG_FILE):
        if existing.exists():
            raise InvalidArgument("enroll.exists", f"{existing} exists; not overwriting it")
    from edgekms import tpmcred

    with enrollment_stub(server, fingerprint) as stub, DeviceTpm(tcti, endorsement_auth) as tpm:
        evidence = tpm.evidence()
        try:
            challenge = stub.BeginAttestation(
                enroll_pb2.BeginAttestationRequest(
                    token=token,
                    ek_certificate=evidence.ek_certificate_der,
                    ek_public=evidence.ek_public,
                    ak_public=evidence.ak_public,
                ),
                timeout=timeout,
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        nonce = tpm.activate(challenge.credential_blob, challenge.encrypted_secret)
        key = tpm.create_key()
        certify_info, certify_signature = tpm.certify(key, nonce)
        # The boot state as enrolled: PCRs 0-7 quoted over the same nonce, with their values.
        pcr_quote, pcr_signature = tpm.quote(ENROLL_PCRS, nonce)
        pcr_values = tpm.pcr_values(ENROLL_PCRS)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_private(key_path, key.to_pem())
        try:
            response = stub.Enroll(
                enroll_pb2.EnrollRequest(
                    token=token,
                    request_id=new_request_id(),
                    challenge_id=challenge.challenge_id,
                    activated_nonce=nonce,
                    key_public=key.public,
                    certify_info=certify_info,
                    certify_signature=certify_signature,
                    pcr_quote=pcr_quote,
                    pcr_quote_signature=pcr_signature,
                    pcr_values=pcr_values,
                ),
                timeout=timeout,
            )
        except grpc.RpcError as exc:
            key_path.unlink(missing_ok=True)
            raise error_from_rpc(exc) from None
    ek_sha256 = tpmcred.ek_identity(tpmcred.parse_public(evidence.ek_public).public_key_der)
    cert_path, ca_path, device_path = out_dir / CERT_FILE, out_dir / CA_FILE, out_dir / DEVICE_FILE
    config_path = out_dir / CONFIG_FILE
    write_public(cert_path, response.certificate_pem.encode())
    write_public(ca_path, response.ca_certificate_pem.encode())
    # The client config of `kmsctl enroll --tpm`: the certified key signs every TLS
    # handshake in this TPM (edgekms.keytunnel), so `--config` works for whoami, key
    # sign and `client renew` with no key on disk.
    values = {
        "broker": f"{host}:{response.broker_port}",
        "ca_cert": CA_FILE,
        "cert": CERT_FILE,
        "key": TPM_KEY_FILE,
        "key_store": "tpm",
        "tpm": tcti or DEFAULT_TCTI,
    }
    if response.server_name:
        values["server_name"] = response.server_name
    write_client_config(config_path, **values)
    write_public(
        device_path,
        json.dumps(
            {
                "name": response.client.name,
                "ek_sha256": ek_sha256.hex(),
                "broker": f"{host}:{response.broker_port}",
                "server_name": response.server_name,
                "enrollment": server,
                "fingerprint": normalize_fingerprint(fingerprint),
            },
            indent=2,
        ).encode()
        + b"\n",
    )
    return AttestedEnrollment(
        response,
        ek_sha256.hex(),
        config_path,
        [key_path, cert_path, ca_path, config_path, device_path],
    )
