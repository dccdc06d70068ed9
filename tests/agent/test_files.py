"""The agent's file writes on a temporary directory: mode from the first byte, no
symbolic link followed, the old file kept when a write cannot happen."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.config import FileOwner
from agent.files import fix_metadata, read_if_regular, write_atomically
from edgekms.errors import InvalidArgument, Unavailable


def test_writes_whole_with_the_mode_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "nas.key"
    write_atomically(target, b"one", 0o600, FileOwner())
    assert target.read_bytes() == b"one" and stat.S_IMODE(target.stat().st_mode) == 0o600
    write_atomically(target, b"two", 0o640, FileOwner())
    assert target.read_bytes() == b"two" and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nas.key"]  # no temporary left


def test_owner_by_number_is_applied(tmp_path: Path) -> None:
    target = tmp_path / "nas.crt"
    write_atomically(target, b"x", 0o644, FileOwner(os.getuid(), os.getgid()))
    assert target.stat().st_uid == os.getuid() and target.stat().st_gid == os.getgid()


def test_a_symlink_target_is_refused_and_its_file_untouched(tmp_path: Path) -> None:
    victim = tmp_path / "shadow"
    victim.write_bytes(b"precious")
    link = tmp_path / "nas.key"
    link.symlink_to(victim)
    with pytest.raises(InvalidArgument) as caught:
        write_atomically(link, b"key", 0o600, FileOwner())
    assert caught.value.reason == "agent.file_symlink"
    assert victim.read_bytes() == b"precious" and link.is_symlink()


def test_a_directory_target_is_refused(tmp_path: Path) -> None:
    (tmp_path / "crl.pem").mkdir()
    with pytest.raises(InvalidArgument) as caught:
        write_atomically(tmp_path / "crl.pem", b"x", 0o644, FileOwner())
    assert caught.value.reason == "agent.file_not_regular"


def test_unknown_owner_is_typed_and_nothing_written(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as caught:
        write_atomically(tmp_path / "a", b"x", 0o644, FileOwner("no-such-user-edgekms"))
    assert caught.value.reason == "agent.owner_unknown"
    assert list(tmp_path.iterdir()) == []


def test_missing_directory_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(Unavailable) as caught:
        write_atomically(tmp_path / "gone" / "a", b"x", 0o644, FileOwner())
    assert caught.value.reason == "agent.file_write_failed"


def test_fix_metadata_puts_a_loosened_key_back(tmp_path: Path) -> None:
    target = tmp_path / "nas.key"
    write_atomically(target, b"k", 0o600, FileOwner())
    target.chmod(0o644)
    assert fix_metadata(target, 0o600, FileOwner()) is True
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert fix_metadata(target, 0o600, FileOwner()) is False


def test_read_if_regular(tmp_path: Path) -> None:
    assert read_if_regular(tmp_path / "absent") is None
    (tmp_path / "big").write_bytes(b"x" * 100)
    assert read_if_regular(tmp_path / "big", limit=10) is None
    assert read_if_regular(tmp_path / "big") == b"x" * 100
    (tmp_path / "link").symlink_to(tmp_path / "big")
    assert read_if_regular(tmp_path / "link") is None
