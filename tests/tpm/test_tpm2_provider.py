"""The TPM provider against a real swtpm: signatures checked by cryptography and openssl,
auth values, dictionary-attack lockout, PCR policies, attestation and slot hygiene."""

from __future__ import annotations

import datetime
import hashlib
import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_HC
from tpm2_pytss.types import TPML_DIGEST_VALUES, TPMT_HA

from crypto_service.config import parse_config
from crypto_service.providers.base import KeyCreateOptions, Provider
from crypto_service.providers.tpm2 import Tpm2Provider, srk_template
from edgekms.algorithms import (
    ALGORITHM_BY_CLI,
    KEY_TYPE_BY_CLI,
    SignatureAlgorithm,
    verify_signature,
)
from edgekms.client_certs import self_signed_ca
from edgekms.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from edgekms.remote_key import remote_key
from edgekms.v1 import common_pb2 as pb
from mgmt.swtpm import Swtpm
from tests.tpm.conftest import AUTH_VALUE, OpenProvider
from tests.tpm.swtpm_fixtures import SwtpmFactory

pytestmark = pytest.mark.tpm

P256 = KEY_TYPE_BY_CLI["ec-p256"].key_type
P384 = KEY_TYPE_BY_CLI["ec-p384"].key_type
RSA2048 = KEY_TYPE_BY_CLI["rsa-2048"].key_type


def new_id() -> bytes:
    return secrets.token_bytes(16)


def transient_handles(tcti: str) -> list[int]:
    with ESAPI(tcti) as esys:
        _, data = esys.get_capability(TPM2_CAP.HANDLES, TPM2_HC.TRANSIENT_FIRST, 64)
        return [int(h) for h in data.data.handles]


# ---- signatures -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key_cli", "alg_cli", "openssl_opts"),
    [
        ("ec-p256", "ecdsa-sha256", []),
        ("ec-p384", "ecdsa-sha384", []),
        ("rsa-2048", "rsa-pkcs1-sha256", []),
        (
            "rsa-2048",
            "rsa-pss-sha256",
            ["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:-1"],
        ),
        (
            "rsa-2048",
            "rsa-pss-sha512",
            ["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:-1"],
        ),
    ],
)
def test_signatures_verify_with_openssl(
    provider: Tpm2Provider, tmp_path: Path, key_cli: str, alg_cli: str, openssl_opts: list[str]
) -> None:
    key_id = new_id()
    made = provider.generate(
        key_id, "openssl", KEY_TYPE_BY_CLI[key_cli].key_type, KeyCreateOptions()
    )
    ainfo = ALGORITHM_BY_CLI[alg_cli]
    message = b"signed inside the TPM " + secrets.token_bytes(8)
    digest = hashlib.new(ainfo.hash_name or "", message).digest()
    signature = provider.sign(key_id, ainfo.algorithm, digest)
    assert verify_signature(made.public_key_der, ainfo.algorithm, digest, signature)

    pub = tmp_path / "pub.pem"
    pub.write_bytes(
        serialization.load_der_public_key(made.public_key_der).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (tmp_path / "msg").write_bytes(message)
    (tmp_path / "sig").write_bytes(signature)
    (tmp_path / "other").write_bytes(message + b"!")

    def openssl_verify(name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "openssl",
                "dgst",
                f"-{ainfo.hash_name}",
                "-verify",
                str(pub),
                *openssl_opts,
                "-signature",
                str(tmp_path / "sig"),
                str(tmp_path / name),
            ],
            capture_output=True,
            text=True,
            check=False,
        )

    good = openssl_verify("msg")
    assert good.returncode == 0 and "Verified OK" in good.stdout, good.stderr
    assert openssl_verify("other").returncode != 0
    provider.destroy(key_id)


def test_certificate_signed_through_remote_key(provider: Tpm2Provider) -> None:
    key_id = new_id()
    made = provider.generate(key_id, "ca/test", P256, KeyCreateOptions())

    class TpmSigner:
        def sign_digest(self, algorithm: SignatureAlgorithm, data: bytes) -> bytes:
            return provider.sign(key_id, algorithm, data)

    key = remote_key(TpmSigner(), made.public_key_der)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "TPM test CA")])
    cert = self_signed_ca(key, name, datetime.timedelta(days=1))
    cert.verify_directly_issued_by(cert)
    assert (
        cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == made.public_key_der
    )
    provider.destroy(key_id)


# ---- errors ------------------------------------------------------------------------------


def test_error_cases(provider: Tpm2Provider) -> None:
    missing = new_id()
    digest = hashlib.sha256(b"x").digest()
    with pytest.raises(NotFound) as nf:
        provider.sign(missing, pb.SIGNATURE_ALGORITHM_ECDSA_SHA256, digest)
    assert nf.value.reason == "key.not_found"
    for call in (provider.public_key, provider.destroy):
        with pytest.raises(NotFound):
            call(missing)
    with pytest.raises(NotFound):
        provider.attest(missing, b"nonce")

    with pytest.raises(FailedPrecondition) as unsupported:
        provider.generate(new_id(), "ed", pb.KEY_TYPE_ED25519, KeyCreateOptions())
    assert unsupported.value.reason == "provider.key_type_unsupported"
    assert pb.KEY_TYPE_ED25519 not in provider.key_types()
    assert {P256, P384, RSA2048} <= provider.key_types()

    key_id = new_id()
    provider.generate(key_id, "dup", P256, KeyCreateOptions())
    with pytest.raises(AlreadyExists):
        provider.generate(key_id, "dup", P256, KeyCreateOptions())
    with pytest.raises(InvalidArgument) as wrong_alg:
        provider.sign(key_id, pb.SIGNATURE_ALGORITHM_RSA_PKCS1_SHA256, digest)
    assert wrong_alg.value.reason == "sign.algorithm_mismatch"
    with pytest.raises(InvalidArgument) as short:
        provider.sign(key_id, pb.SIGNATURE_ALGORITHM_ECDSA_SHA256, digest[:20])
    assert short.value.reason == "sign.digest_length"
    with pytest.raises(InvalidArgument):
        provider.generate(new_id(), "pcr", P256, KeyCreateOptions(pcr_indexes=(24,)))
    with pytest.raises(InvalidArgument):
        provider.attest(key_id, b"")
    provider.destroy(key_id)
    assert key_id not in {k.key_id for k in provider.list_keys()}


def test_state_files_and_listing(provider: Tpm2Provider) -> None:
    key_id = new_id()
    provider.generate(key_id, "listed", P384, KeyCreateOptions())
    path = provider.state_dir / (key_id.hex() + ".key")
    assert path.stat().st_mode & 0o777 == 0o600
    assert not [p for p in provider.state_dir.iterdir() if p.name.endswith(".tmp")]
    listed = {k.key_id: k for k in provider.list_keys()}
    assert listed[key_id].label == "listed" and listed[key_id].key_type == P384
    der, key_type = provider.public_key(key_id)
    assert key_type == P384
    assert isinstance(serialization.load_der_public_key(der), ec.EllipticCurvePublicKey)
    provider.destroy(key_id)
    assert not path.exists()


def test_auth_required_without_auth_file(
    swtpm: Swtpm, tmp_path: Path, open_provider: OpenProvider, provider: Tpm2Provider
) -> None:
    provider.close()  # swtpm serves one client at a time
    bare = open_provider(swtpm, tmp_path / "state")
    with pytest.raises(FailedPrecondition) as exc:
        bare.generate(new_id(), "a", P256, KeyCreateOptions(require_auth=True))
    assert exc.value.reason == "tpm.auth_unconfigured"
    assert bare.list_keys() == []


def test_tpm_absent_is_unavailable(tmp_path: Path) -> None:
    from mgmt.natsserver import free_port_pair

    tcti = f"swtpm:host=127.0.0.1,port={free_port_pair()}"
    from crypto_service.config import Tpm2Config

    with pytest.raises(Unavailable) as exc:
        Tpm2Provider(Tpm2Config(tcti=tcti, state_dir=tmp_path))
    assert exc.value.reason == "tpm.unavailable"
    assert tcti in exc.value.message
    with pytest.raises(Unavailable) as dev:
        Tpm2Provider(Tpm2Config(tcti="device:/dev/edgekms-no-such-tpm", state_dir=tmp_path))
    assert "/dev/edgekms-no-such-tpm" in dev.value.message


def test_tpm_restart_reconnects(
    swtpm_factory: SwtpmFactory, tmp_path: Path, open_provider: OpenProvider
) -> None:
    tpm = swtpm_factory()
    prov = open_provider(tpm, tmp_path / "state")
    key_id = new_id()
    made = prov.generate(key_id, "r", P256, KeyCreateOptions())
    digest = hashlib.sha256(b"restart").digest()
    tpm.stop()
    with pytest.raises(Unavailable) as exc:
        prov.sign(key_id, pb.SIGNATURE_ALGORITHM_ECDSA_SHA256, digest)
    assert exc.value.reason == "tpm.unavailable"
    tpm.start()  # same state dir and port: a reboot of the board
    sig = prov.sign(key_id, pb.SIGNATURE_ALGORITHM_ECDSA_SHA256, digest)
    assert verify_signature(made.public_key_der, pb.SIGNATURE_ALGORITHM_ECDSA_SHA256, digest, sig)


def test_persistent_srk(
    swtpm_factory: SwtpmFactory, tmp_path: Path, open_provider: OpenProvider
) -> None:
    tpm = swtpm_factory()
    with ESAPI(tpm.tcti) as esys:
        handle, *_ = esys.create_primary(None, srk_template(), ESYS_TR.OWNER)
        esys.evict_control(ESYS_TR.OWNER, handle, 0x81000001)
        esys.flush_context(handle)
    with pytest.raises(FailedPrecondition) as missing:
        open_provider(tpm, tmp_path / "s1", srk_handle=0x81000002)
    assert missing.value.reason == "tpm.srk_missing"
    prov = open_provider(tpm, tmp_path / "s2", srk_handle=0x81000001)
    key_id = new_id()
    made = prov.generate(key_id, "p", RSA2048, KeyCreateOptions())
    digest = hashlib.sha256(b"srk").digest()
    sig = prov.sign(key_id, pb.SIGNATURE_ALGORITHM_RSA_PKCS1_SHA256, digest)
    assert verify_signature(
        made.public_key_der, pb.SIGNATURE_ALGORITHM_RSA_PKCS1_SHA256, digest, sig
    )


def test_config_reads_typed_tpm2_fields(tmp_path: Path) -> None:
    config = parse_config(
        {
            "provider_id": "tpm0",
            "nats_url": "nats://127.0.0.1:4222",
            "tpm2": {
                "tcti": "device:/dev/tpmrm0",
                "state_dir": str(tmp_path),
                "srk_handle": 0x81000001,
                "key_auth_file": str(tmp_path / "auth"),
            },
        }
    )
    assert config.tpm2 is not None
    assert config.tpm2.srk_handle == 0x81000001
    assert config.tpm2.key_auth_file == tmp_path / "auth"
    assert config.tpm2.extra == {}


# ---- auth values and lockout --------------------------------------------------------------


# The TPM forgives one failed authorisation per interval. Long enough that the steps
# between the first failure and the last check made while locked out (a few TPM
# commands) cannot outlast it on a loaded machine; the test then waits one interval.
LOCKOUT_INTERVAL = 20


def test_auth_value_and_lockout(
    swtpm_factory: SwtpmFactory, tmp_path: Path, open_provider: OpenProvider
) -> None:
    tpm = swtpm_factory()
    with ESAPI(tpm.tcti) as esys:  # 2 tries, one forgiven per interval, no lockout-auth retry
        esys.dictionary_attack_parameters(2, LOCKOUT_INTERVAL, 0)
    auth = tmp_path / "auth"
    auth.write_bytes(AUTH_VALUE)
    prov = open_provider(tpm, tmp_path / "state", key_auth_file=auth)
    key_id = new_id()
    made = prov.generate(key_id, "auth", P256, KeyCreateOptions(require_auth=True))
    digest = hashlib.sha256(b"auth").digest()
    alg = pb.SIGNATURE_ALGORITHM_ECDSA_SHA256
    assert verify_signature(made.public_key_der, alg, digest, prov.sign(key_id, alg, digest))

    auth.write_bytes(b"wrong guess")
    with pytest.raises(PermissionDenied) as denied:
        prov.sign(key_id, alg, digest)
    assert denied.value.reason == "tpm.auth_failed"
    assert denied.value.details["rc"] == "0x98e"
    with pytest.raises(PermissionDenied) as second:
        prov.sign(key_id, alg, digest)  # the second failure reaches max_tries
    assert second.value.reason == "tpm.auth_failed"
    with pytest.raises(FailedPrecondition) as locked:
        prov.sign(key_id, alg, digest)
    assert locked.value.reason == "tpm.lockout"
    assert locked.value.details["rc"] == "0x921"
    assert locked.value.details["max_tries"] == "2"
    assert locked.value.details["lockout_interval_seconds"] == str(LOCKOUT_INTERVAL)
    assert locked.value.details["retry_after_seconds"] == str(LOCKOUT_INTERVAL)

    auth.write_bytes(AUTH_VALUE)  # the right value is refused too while locked out
    with pytest.raises(FailedPrecondition) as still:
        prov.sign(key_id, alg, digest)
    assert still.value.reason == "tpm.lockout"
    # noDA keys (no auth value) keep working during lockout.
    free_id = new_id()
    free = prov.generate(free_id, "noda", P256, KeyCreateOptions())
    assert verify_signature(free.public_key_der, alg, digest, prov.sign(free_id, alg, digest))

    # Once the TPM has forgiven a failure the key signs again; polled for, with room.
    deadline = time.monotonic() + 3 * LOCKOUT_INTERVAL + 30
    while True:
        try:
            sig = prov.sign(key_id, alg, digest)
            break
        except FailedPrecondition as err:
            assert err.reason == "tpm.lockout"
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert verify_signature(made.public_key_der, alg, digest, sig)


# ---- PCR policy ------------------------------------------------------------------------------


def test_pcr_bound_key_refused_after_extend(
    swtpm_factory: SwtpmFactory, tmp_path: Path, open_provider: OpenProvider
) -> None:
    tpm = swtpm_factory()
    auth = tmp_path / "auth"
    auth.write_bytes(AUTH_VALUE)
    state = tmp_path / "state"
    prov = open_provider(tpm, state, key_auth_file=auth)
    bound, bound_auth = new_id(), new_id()
    made = prov.generate(bound, "pcr", P256, KeyCreateOptions(pcr_indexes=(16,)))
    prov.generate(
        bound_auth, "pcr+auth", RSA2048, KeyCreateOptions(pcr_indexes=(16, 23), require_auth=True)
    )
    digest = hashlib.sha256(b"pcr").digest()
    alg = pb.SIGNATURE_ALGORITHM_ECDSA_SHA256
    assert verify_signature(made.public_key_der, alg, digest, prov.sign(bound, alg, digest))
    prov.sign(bound_auth, pb.SIGNATURE_ALGORITHM_RSA_PSS_SHA256, digest)
    prov.close()

    with ESAPI(tpm.tcti) as esys:
        measurement = TPMT_HA(hashAlg=TPM2_ALG.SHA256)
        measurement.digest.sha256 = os.urandom(32)
        esys.pcr_extend(ESYS_TR.PCR16, TPML_DIGEST_VALUES([measurement]))

    prov = open_provider(tpm, state, key_auth_file=auth)
    with pytest.raises(FailedPrecondition) as refused:
        prov.sign(bound, alg, digest)
    assert refused.value.reason == "tpm.policy_failed"
    with pytest.raises(FailedPrecondition) as refused2:
        prov.sign(bound_auth, pb.SIGNATURE_ALGORITHM_RSA_PSS_SHA256, digest)
    assert refused2.value.reason == "tpm.policy_failed"
    # A key bound now takes the new values and signs.
    fresh = new_id()
    prov.generate(fresh, "pcr-new", P256, KeyCreateOptions(pcr_indexes=(16,)))
    prov.sign(fresh, alg, digest)


# ---- slots ---------------------------------------------------------------------------------


def test_many_keys_in_turn_never_exhaust_slots(provider: Tpm2Provider, swtpm: Swtpm) -> None:
    keys: list[tuple[bytes, bytes]] = []
    for i in range(55):
        key_id = new_id()
        opts = KeyCreateOptions(require_auth=i % 5 == 0)
        keys.append((key_id, provider.generate(key_id, f"k{i}", P256, opts).public_key_der))
    alg = pb.SIGNATURE_ALGORITHM_ECDSA_SHA256
    for round_ in range(2):
        for n, (key_id, der) in enumerate(keys):
            digest = hashlib.sha256(f"{round_}/{n}".encode()).digest()
            assert verify_signature(der, alg, digest, provider.sign(key_id, alg, digest))
    for key_id, _ in keys[:5]:
        provider.attest(key_id, b"slots")
    provider.close()
    assert transient_handles(swtpm.tcti) == []  # nothing left loaded, not even the SRK


def test_provider_is_a_provider(provider: Tpm2Provider) -> None:
    assert isinstance(provider, Provider)
    assert provider.kind == "tpm2"
