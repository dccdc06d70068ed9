"""TPM ownership against a real swtpm: its sockets reachable only by their owner, and
`kmsctl tpm provision` setting hierarchy auth so that empty-auth lockout reset and
TPM2_Clear are refused, while the TPM provider keeps working with the owner auth."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import TPM2_CAP, TPM2_PT

from crypto_service.config import Tpm2Config
from crypto_service.providers.base import KeyCreateOptions
from crypto_service.providers.tpm2 import Tpm2Provider
from edgekms.algorithms import verify_signature
from edgekms.errors import PermissionDenied
from edgekms.v1 import common_pb2 as pb
from mgmt.cli.common import ExitCode
from mgmt.swtpm import Swtpm
from mgmt.tpm_provision import HIERARCHIES, auth_file, provision
from tests.tpm.swtpm_fixtures import SwtpmFactory

pytestmark = pytest.mark.tpm

KMSCTL = str(Path(sys.executable).parent / "kmsctl")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="dropping to user nobody needs root")


def tpm2(tcti: str, *args: str, as_nobody: bool = False) -> subprocess.CompletedProcess[str]:
    """A tpm2-tools command; as user nobody (uid/gid 65534, no groups) when asked."""
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if as_nobody else []
    return subprocess.run(
        [*drop, *args, "-T", tcti], capture_output=True, text=True, timeout=60, check=False
    )


def tpm_property(tcti: str, prop: TPM2_PT) -> int:
    with ESAPI(tcti) as esys:
        _, data = esys.get_capability(TPM2_CAP.TPM_PROPERTIES, prop, 1)
        return int(data.data.tpmProperties[0].value)


@needs_root
def test_user_nobody_cannot_drive_the_development_swtpm(swtpm_factory: SwtpmFactory) -> None:
    tpm = swtpm_factory()
    for path in (tpm.config.socket_path, tpm.config.ctrl_path):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.geteuid()
    refused = tpm2(tpm.tcti, "tpm2_dictionarylockout", "--clear-lockout", as_nobody=True)
    assert refused.returncode != 0
    assert "Could not load tcti" in refused.stderr
    # The owner still can (empty lockout auth: this swtpm is not provisioned yet).
    allowed = tpm2(tpm.tcti, "tpm2_dictionarylockout", "--clear-lockout")
    assert allowed.returncode == 0, allowed.stderr


def test_provision_sets_auth_and_refuses_empty_auth_clear(tmp_path: Path) -> None:
    tpm = Swtpm.private(tmp_path / "swtpm", lock_platform=True).start()
    try:
        secrets_dir = tmp_path / "secrets"
        first = provision(tpm.tcti, secrets_dir)
        assert first.auth == dict.fromkeys(HIERARCHIES, "set")
        for name in HIERARCHIES:
            assert stat.S_IMODE(auth_file(secrets_dir, name).stat().st_mode) == 0o600
            assert len(auth_file(secrets_dir, name).read_bytes()) == 32
        assert tpm_property(tpm.tcti, TPM2_PT.PERMANENT) & 0x7 == 0x7
        assert tpm_property(tpm.tcti, TPM2_PT.MAX_AUTH_FAIL) == 10
        assert provision(tpm.tcti, secrets_dir).auth == dict.fromkeys(HIERARCHIES, "kept")

        # The provider signs and attests with the owner and endorsement auth...
        state = tmp_path / "state"
        config = Tpm2Config(  # type: ignore[call-arg]
            tcti=tpm.tcti,
            state_dir=state,
            owner_auth_file=auth_file(secrets_dir, "owner"),
            endorsement_auth_file=auth_file(secrets_dir, "endorsement"),
        )
        provider = Tpm2Provider(config)
        try:
            key_id = b"\x01" * 16
            made = provider.generate(key_id, "owned", pb.KEY_TYPE_EC_P256, KeyCreateOptions())
            digest = hashlib.sha256(b"owned").digest()
            alg = pb.SIGNATURE_ALGORITHM_ECDSA_SHA256
            signature = provider.sign(key_id, alg, digest)
            assert verify_signature(made.public_key_der, alg, digest, signature)
            assert provider.attestation_key()
            assert provider.auth_fail_limits() == (10, 600.0)
        finally:
            provider.close()
        # ...and without the owner auth it is refused with a typed error.
        with pytest.raises(PermissionDenied) as refused:
            Tpm2Provider(Tpm2Config(tcti=tpm.tcti, state_dir=state))  # type: ignore[call-arg]
        assert refused.value.reason == "tpm.hierarchy_auth_failed"

        lockout = auth_file(secrets_dir, "lockout")
        with_auth = tpm2(
            tpm.tcti, "tpm2_dictionarylockout", "--clear-lockout", "-p", f"file:{lockout}"
        )
        assert with_auth.returncode == 0, with_auth.stderr
        no_auth = tpm2(tpm.tcti, "tpm2_dictionarylockout", "--clear-lockout")
        assert no_auth.returncode != 0
        assert "0x9a2" in no_auth.stderr.lower() or "authorization" in no_auth.stderr.lower()
        for hierarchy in ("l", "p"):  # empty lockout auth; the platform hierarchy is off
            cleared = tpm2(tpm.tcti, "tpm2_clear", "-c", hierarchy)
            assert cleared.returncode != 0, cleared.stdout
        # Nothing was cleared: the hierarchies still have their auth, the key still signs.
        assert tpm_property(tpm.tcti, TPM2_PT.PERMANENT) & 0x7 == 0x7
        provider = Tpm2Provider(config)
        try:
            assert provider.sign(key_id, alg, digest)
        finally:
            provider.close()
    finally:
        tpm.stop()


def test_kmsctl_tpm_provision_is_idempotent_and_refuses_a_foreign_owner(
    swtpm_factory: SwtpmFactory, tmp_path: Path
) -> None:
    tpm = swtpm_factory()

    def kmsctl(data_dir: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [KMSCTL, "tpm", "provision", "--tpm", tpm.tcti, "--max-tries", "5",
             "--data-dir", str(data_dir), "-o", "json"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    first = kmsctl(tmp_path / "mine")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["auth"] == dict.fromkeys(HIERARCHIES, "set")
    again = kmsctl(tmp_path / "mine")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["auth"] == dict.fromkeys(HIERARCHIES, "kept")
    assert tpm_property(tpm.tcti, TPM2_PT.MAX_AUTH_FAIL) == 5

    foreign = kmsctl(tmp_path / "theirs")
    assert foreign.returncode == ExitCode.FAILED_PRECONDITION, foreign.stderr
    assert "kmsctl: tpm.owned_elsewhere:" in foreign.stderr
    assert not (tmp_path / "theirs" / "secrets").exists()  # nothing written
    for name in HIERARCHIES:  # and the rightful owner's values still work
        assert auth_file(tmp_path / "mine" / "secrets", name).exists()
    assert kmsctl(tmp_path / "mine").returncode == 0
