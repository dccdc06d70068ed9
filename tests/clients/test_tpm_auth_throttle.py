"""The crypto service's AuthGuard keeps a real TPM (swtpm, DA max tries lowered to 3)
out of dictionary-attack lockout: wrong auth values stop reaching the TPM one short of
its limit, and the TPM's own counter proves it never locked out."""

from __future__ import annotations

import hashlib
import secrets
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest
from tpm2_pytss import ESAPI

from crypto_service.config import Tpm2Config
from crypto_service.providers.tpm2 import Tpm2Provider
from crypto_service.throttle import STATE_FILE
from edgekms.algorithms import verify_signature
from edgekms.crypto_client import CryptoClient
from edgekms.errors import PermissionDenied, ResourceExhausted
from edgekms.v1 import common_pb2 as pb
from edgekms.v1 import crypto_pb2
from mgmt.natsserver import NatsServer
from tests.logevents import count_event, has_event
from tests.tpm.guarded import MAX_TRIES, RECOVERY, RIGHT_AUTH, guarded_tpm, lockout_counter
from tests.tpm.swtpm_fixtures import SwtpmFactory, swtpm_factory

__all__ = ["swtpm_factory"]

pytestmark = pytest.mark.tpm

ALG = pb.SIGNATURE_ALGORITHM_ECDSA_SHA256


async def test_guard_keeps_the_tpm_out_of_lockout(
    nats_server: NatsServer, swtpm_factory: SwtpmFactory, tmp_path: Path
) -> None:
    digest = hashlib.sha256(b"guard").digest()
    async with guarded_tpm(nats_server.url, swtpm_factory(), tmp_path, "tpmguard") as tpm:
        assert tpm.guard.max_failures == MAX_TRIES - 1
        crypto = tpm.crypto
        request = crypto_pb2.SignRequest(key_id=tpm.key_id, algorithm=ALG, data=digest)
        good = await crypto.sign("tpmguard", request, timeout=30)
        assert verify_signature(tpm.public_key_der, ALG, digest, good.signature)

        tpm.auth.write_bytes(b"a wrong guess")
        for _ in range(MAX_TRIES - 1):
            with pytest.raises(PermissionDenied) as denied:
                await crypto.sign("tpmguard", request, timeout=30)
            assert denied.value.reason == "tpm.auth_failed"
        for _ in range(5):  # without the guard, the first of these would lock the TPM out
            with pytest.raises(ResourceExhausted) as throttled:
                await crypto.sign("tpmguard", request, timeout=30)
            assert throttled.value.reason == "auth.throttled"
            assert int(throttled.value.details["retry_after_seconds"]) > 0

    assert lockout_counter(tpm.tcti) == MAX_TRIES - 1  # the refused guesses never got there
    # Not locked out: with the right value the key signs at once (no waiting 600 s).
    tpm.auth.write_bytes(RIGHT_AUTH)
    fresh = tpm.provider()
    try:
        signature = fresh.sign(tpm.key_id, ALG, digest)
    finally:
        fresh.close()
    assert verify_signature(tpm.public_key_der, ALG, digest, signature)


KMS_CRYPTO = str(Path(sys.executable).parent / "kms-crypto")


def start_kms_crypto(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """A real kms-crypto process; returns once it has registered on the bus."""
    started = count_event(log.read_text(errors="replace"), "service_started") if log.exists() else 0
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [KMS_CRYPTO, "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while count_event(log.read_text(errors="replace"), "service_started") <= started:
        assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
        time.sleep(0.05)
    return proc


async def test_guard_counts_survive_a_kill_9(
    nats_server: NatsServer, swtpm_factory: SwtpmFactory, tmp_path: Path
) -> None:
    """Two failures, kill -9 of kms-crypto, a fresh process: the guesses that follow are
    throttled, and swtpm's own lockout counter proves none of them reached the TPM."""
    tpm = swtpm_factory()
    with ESAPI(tpm.tcti) as esys:
        esys.dictionary_attack_parameters(MAX_TRIES, RECOVERY, 0)
    auth = tmp_path / "key-auth"
    auth.write_bytes(RIGHT_AUTH)
    state_dir = tmp_path / "state"
    config = tmp_path / "tpm.toml"
    config.write_text(
        f'provider_id = "tpmkill"\nnats_url = "{nats_server.url}"\n[tpm2]\n'
        f'tcti = "{tpm.tcti}"\nstate_dir = "{state_dir}"\nkey_auth_file = "{auth}"\n'
    )
    log = tmp_path / "kms-crypto.log"
    digest = hashlib.sha256(b"guard across restarts").digest()
    first = start_kms_crypto(config, log)
    second: subprocess.Popen[bytes] | None = None
    nc = await nats.connect(nats_server.url)
    try:
        crypto = CryptoClient(nc, default_timeout=30)
        key_id = secrets.token_bytes(16)
        made = await crypto.generate_key(
            "tpmkill",
            crypto_pb2.GenerateKeyRequest(
                key_id=key_id,
                label="kill9",
                key_type=pb.KEY_TYPE_EC_P256,
                options=pb.KeyOptions(require_auth=True),
            ),
            timeout=60,
        )
        request = crypto_pb2.SignRequest(key_id=key_id, algorithm=ALG, data=digest)
        await crypto.sign("tpmkill", request)
        auth.write_bytes(b"a wrong guess")
        for _ in range(MAX_TRIES - 1):
            with pytest.raises(PermissionDenied) as denied:
                await crypto.sign("tpmkill", request)
            assert denied.value.reason == "tpm.auth_failed"

        first.send_signal(signal.SIGKILL)
        first.wait(30)
        second = start_kms_crypto(config, log)
        for _ in range(3):  # without the saved counts, the first would lock the TPM out
            with pytest.raises(ResourceExhausted) as throttled:
                await crypto.sign("tpmkill", request)
            assert throttled.value.reason == "auth.throttled"
        assert has_event(log.read_text(), "auth_guard_restored", failures=2)
        assert stat.S_IMODE((state_dir / STATE_FILE).stat().st_mode) == 0o600
    finally:
        await nc.close()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)

    assert lockout_counter(tpm.tcti) == MAX_TRIES - 1
    auth.write_bytes(RIGHT_AUTH)
    fresh = Tpm2Provider(
        Tpm2Config(tcti=tpm.tcti, state_dir=state_dir, key_auth_file=auth)  # type: ignore[call-arg]
    )
    try:
        signature = fresh.sign(key_id, ALG, digest)
    finally:
        fresh.close()
    assert verify_signature(made.public_key_der, ALG, digest, signature)
