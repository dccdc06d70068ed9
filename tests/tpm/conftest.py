"""Fixtures of the TPM tests: a session swtpm, fresh ones on demand, and providers on them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from crypto_service.config import Tpm2Config
from crypto_service.providers.tpm2 import Tpm2Provider
from mgmt.swtpm import Swtpm
from tests.tpm.swtpm_fixtures import swtpm, swtpm_factory

__all__ = ["swtpm", "swtpm_factory"]

AUTH_VALUE = b"correct horse"

OpenProvider = Callable[..., Tpm2Provider]


@pytest.fixture(scope="session")
def tpm_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(state_dir, key_auth_file) shared by the providers on the session swtpm."""
    base = tmp_path_factory.mktemp("tpm2-provider")
    auth = base / "key-auth"
    auth.write_bytes(AUTH_VALUE + b"\n")
    auth.chmod(0o600)
    return base / "state", auth


@pytest.fixture
def open_provider() -> Iterator[OpenProvider]:
    """Opens providers (closing each at teardown); tests close early to free swtpm's one slot."""
    opened: list[Tpm2Provider] = []

    def make(tpm: Swtpm, state_dir: Path, **fields: object) -> Tpm2Provider:
        provider = Tpm2Provider(Tpm2Config(tcti=tpm.tcti, state_dir=state_dir, **fields))  # type: ignore[arg-type]
        opened.append(provider)
        return provider

    yield make
    for provider in opened:
        provider.close()


@pytest.fixture
def provider(
    swtpm: Swtpm, tpm_dirs: tuple[Path, Path], open_provider: OpenProvider
) -> Tpm2Provider:
    state_dir, auth = tpm_dirs
    return open_provider(swtpm, state_dir, key_auth_file=auth)
