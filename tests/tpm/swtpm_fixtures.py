"""swtpm fixtures, importable by any conftest that needs a TPM (tests/tpm, tests/contract).

Each swtpm has its own state directory and its own Unix sockets (0600) in it, as
`kmsctl up --tpm swtpm` runs it. swtpm serves one client at a time, so a test holds a
provider open only while it uses it, and tests that need a TPM of their own (lockout,
restarts) take a fresh one from `swtpm_factory`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mgmt.swtpm import Swtpm

SwtpmFactory = Callable[[], Swtpm]


def _require_swtpm() -> None:
    if shutil.which("swtpm") is None:
        pytest.skip("swtpm is not installed (Debian package swtpm)")


@pytest.fixture(scope="session")
def swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    _require_swtpm()
    tpm = Swtpm.private(tmp_path_factory.mktemp("swtpm") / "state").start()
    yield tpm
    tpm.stop()


@pytest.fixture
def swtpm_factory(tmp_path: Path) -> Iterator[SwtpmFactory]:
    _require_swtpm()
    started: list[Swtpm] = []

    def make() -> Swtpm:
        tpm = Swtpm.private(tmp_path / f"swtpm{len(started)}").start()
        started.append(tpm)
        return tpm

    yield make
    for tpm in started:
        tpm.stop()
