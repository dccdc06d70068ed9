"""The TPM's health as the crypto service reports it (crypto_service.health), on a real
swtpm: its dictionary-attack counter rising with wrong auth values, and the lockout the
example alert EdgeKMSTPMLockout fires on; and a token that stops answering."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from tpm2_pytss import ESAPI

from crypto_service.config import Tpm2Config
from crypto_service.health import TokenHealth
from crypto_service.providers.base import KeyCreateOptions
from crypto_service.providers.tpm2 import Tpm2Provider
from edgekms.errors import FailedPrecondition, PermissionDenied
from edgekms.metrics import ServiceMetrics
from edgekms.v1 import common_pb2 as pb
from tests.tpm.swtpm_fixtures import SwtpmFactory, swtpm_factory  # noqa: F401

pytestmark = pytest.mark.tpm


def _value(metrics: ServiceMetrics, name: str) -> float:
    text = metrics.render().decode()
    line = next(line for line in text.splitlines() if line.startswith(name + "{"))
    return float(line.rsplit(" ", 1)[1])


@pytest.fixture
def provider_and_auth(
    swtpm_factory: SwtpmFactory,  # noqa: F811
    tmp_path: Path,
) -> Iterator[tuple[Tpm2Provider, Path]]:
    tpm = swtpm_factory()
    with ESAPI(tpm.tcti) as esys:  # 2 tries, nothing forgiven during the test
        esys.dictionary_attack_parameters(2, 600, 0)
    auth = tmp_path / "auth"
    auth.write_bytes(b"the right value")
    provider = Tpm2Provider(
        Tpm2Config(tcti=tpm.tcti, state_dir=tmp_path / "state", key_auth_file=auth)  # type: ignore[call-arg]
    )
    yield provider, auth
    provider.close()


async def test_wrong_auth_values_show_in_the_lockout_gauges(
    provider_and_auth: tuple[Tpm2Provider, Path],
) -> None:
    provider, auth = provider_and_auth
    metrics = ServiceMetrics("crypto-tpm0")
    health = TokenHealth(metrics, provider, "tpm0")
    await health.probe()
    assert health.up
    assert _value(metrics, "edgekms_token_up") == 1
    assert _value(metrics, "edgekms_tpm_max_auth_fail") == 2
    assert _value(metrics, "edgekms_tpm_lockout_counter") == 0
    assert _value(metrics, "edgekms_tpm_in_lockout") == 0

    key_id = secrets.token_bytes(16)
    provider.generate(key_id, "guarded", pb.KEY_TYPE_EC_P256, KeyCreateOptions(require_auth=True))
    digest = hashlib.sha256(b"m").digest()
    auth.write_bytes(b"a wrong guess")
    with pytest.raises(PermissionDenied):
        provider.sign(key_id, pb.SIGNATURE_ALGORITHM_ECDSA_SHA256, digest)
    await health.probe()
    assert _value(metrics, "edgekms_tpm_lockout_counter") == 1
    assert _value(metrics, "edgekms_tpm_in_lockout") == 0
    with pytest.raises(PermissionDenied):
        provider.sign(key_id, pb.SIGNATURE_ALGORITHM_ECDSA_SHA256, digest)
    with pytest.raises(FailedPrecondition, match="lockout"):
        provider.sign(key_id, pb.SIGNATURE_ALGORITHM_ECDSA_SHA256, digest)
    await health.probe()
    # In lockout the TPM still answers GetCapability: the token is up, and says why not.
    assert health.up
    assert _value(metrics, "edgekms_tpm_lockout_counter") == 2
    assert _value(metrics, "edgekms_tpm_in_lockout") == 1


async def test_a_tpm_that_stops_answering_is_down(
    provider_and_auth: tuple[Tpm2Provider, Path],
) -> None:
    provider, _ = provider_and_auth
    metrics = ServiceMetrics("crypto-tpm0")
    health = TokenHealth(metrics, provider, "tpm0")
    await health.probe()
    assert health.up
    provider.close()
    await health.probe()
    assert not health.up and health.last_error.startswith("tpm.closed")
    assert _value(metrics, "edgekms_token_up") == 0
