"""The provider registry of the contract suite: every Provider passes the same tests.

HOW ANOTHER PROVIDER PLUGS IN (e.g. the TPM engineer adding "tpm2"):

1. Write a factory: a context manager taking the pytest `request` and yielding a ready
   Provider on real parts, closing it (and anything it started) on exit. Get the real
   parts through `request.getfixturevalue("<fixture>")`; the `provider` fixture is
   module-scoped, so the fixture you ask for must be module- or session-scoped (a
   function-scoped one raises ScopeMismatch).
2. Add it to PROVIDER_FACTORIES under the provider's kind:

       @contextmanager
       def _tpm2(request: pytest.FixtureRequest) -> Iterator[Provider]:
           swtpm = request.getfixturevalue("swtpm")          # your session fixture
           provider = Tpm2Provider(Tpm2Config(tcti=swtpm.tcti, state_dir=...))
           try:
               yield provider
           finally:
               provider.close()

       PROVIDER_FACTORIES["tpm2"] = _tpm2

Every test in test_provider_contract.py then runs once per entry (ids "pkcs11", "tpm2").
Key types a provider does not list in key_types() are skipped with a reason naming the
provider, never silently passed.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest

from crypto_service.config import Pkcs11Config
from crypto_service.providers.base import KeyCreateOptions, Provider
from crypto_service.providers.pkcs11 import Pkcs11Provider
from edgekms.algorithms import KEY_TYPES, KeyType
from tests.conftest import TokenInfo
from tests.tpm.swtpm_fixtures import swtpm  # noqa: F401 - the session swtpm for "tpm2"

ProviderFactory = Callable[[pytest.FixtureRequest], AbstractContextManager[Provider]]


@contextmanager
def _pkcs11(request: pytest.FixtureRequest) -> Iterator[Provider]:
    token: TokenInfo = request.getfixturevalue("softhsm_token")
    config = Pkcs11Config(module=token.module, token_label=token.label, sessions=4)
    provider = Pkcs11Provider(config, token.pin)
    try:
        yield provider
    finally:
        provider.close()


@contextmanager
def _tpm2(request: pytest.FixtureRequest) -> Iterator[Provider]:
    from crypto_service.config import Tpm2Config
    from crypto_service.providers.tpm2 import Tpm2Provider

    tpm = request.getfixturevalue("swtpm")
    state_dir = request.getfixturevalue("tmp_path_factory").mktemp("tpm2-contract")
    provider = Tpm2Provider(Tpm2Config(tcti=tpm.tcti, state_dir=state_dir))
    try:
        yield provider
    finally:
        provider.close()


# kind -> factory. Add yours here (see the module docstring).
PROVIDER_FACTORIES: dict[str, ProviderFactory] = {
    "pkcs11": _pkcs11,
    "tpm2": _tpm2,
}


@pytest.fixture(scope="module", params=sorted(PROVIDER_FACTORIES))
def provider(request: pytest.FixtureRequest) -> Iterator[Provider]:
    with PROVIDER_FACTORIES[request.param](request) as made:
        yield made


class KeyCache:
    """One generated key per (provider, key type) for the module: RSA-4096 is slow."""

    def __init__(self, provider: Provider) -> None:
        self.provider = provider
        self.keys: dict[KeyType, tuple[bytes, bytes]] = {}

    def get(self, key_type: KeyType) -> tuple[bytes, bytes]:
        """(key_id, SubjectPublicKeyInfo DER), generated on first use."""
        if key_type not in self.keys:
            key_id = secrets.token_bytes(16)
            made = self.provider.generate(
                key_id, f"contract-{key_type}", key_type, KeyCreateOptions()
            )
            self.keys[key_type] = (made.key_id, made.public_key_der)
        return self.keys[key_type]


@pytest.fixture(scope="module")
def key_cache(provider: Provider) -> KeyCache:
    return KeyCache(provider)


def require_key_type(provider: Provider, key_type: KeyType) -> None:
    """Skip, with a reason naming the provider, where it cannot hold this key type."""
    if key_type not in provider.key_types():
        name = KEY_TYPES[key_type].cli_name if key_type in KEY_TYPES else str(key_type)
        pytest.skip(f"provider {provider.kind!r} does not list key type {name}")
