"""mgmt.outfile on a real file system: what each kind of path gets when a command writes to
it. Devices are made with mknod (the tests run as root, as `make test` does)."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from edgekms.errors import InvalidArgument
from mgmt.cli.client_access import write_output
from mgmt.outfile import write_file
from mgmt.pki import write_private

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")


def make_null(path: Path) -> Path:
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return path


def assert_still_null(path: Path) -> None:
    st = os.lstat(path)
    assert stat.S_ISCHR(st.st_mode), f"{path} is no longer a character device"
    assert st.st_rdev == os.makedev(1, 3)


def test_new_path_is_written_whole_and_public(tmp_path: Path) -> None:
    target = tmp_path / "new.sig"
    write_output(str(target), b"signature")
    assert target.read_bytes() == b"signature"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["new.sig"]  # no temporary file left


def test_existing_regular_file_is_replaced_and_keeps_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "old.pem"
    target.write_bytes(b"old")
    target.chmod(0o640)
    inode = target.stat().st_ino
    write_output(str(target), b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert target.stat().st_ino != inode  # replaced by rename, not rewritten in place


def test_private_files_are_0600_even_over_a_public_one(tmp_path: Path) -> None:
    target = tmp_path / "k.key"
    target.write_bytes(b"old")
    target.chmod(0o644)
    write_private(target, b"secret")
    assert target.read_bytes() == b"secret"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


@needs_root
def test_character_device_is_written_in_place(tmp_path: Path) -> None:
    dev = make_null(tmp_path / "null")
    write_output(str(dev), b"discarded")
    write_private(dev, b"discarded key")
    assert_still_null(dev)
    assert [p.name for p in tmp_path.iterdir()] == ["null"]


@needs_root
def test_symlink_to_a_device_is_written_through(tmp_path: Path) -> None:
    dev = make_null(tmp_path / "null")
    link = tmp_path / "out"
    link.symlink_to(dev)
    write_output(str(link), b"discarded")
    assert link.is_symlink()
    assert_still_null(dev)


def test_fifo_is_written_in_place(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    write_output(str(fifo), b"through the pipe")
    reader.join(30)
    assert got == [b"through the pipe"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.parametrize("dangling", [False, True], ids=["to_a_file", "dangling"])
def test_symlink_to_a_regular_file_or_nothing_is_refused(tmp_path: Path, dangling: bool) -> None:
    victim = tmp_path / "victim"
    if not dangling:
        victim.write_bytes(b"precious")
    link = tmp_path / "out"
    link.symlink_to(victim)
    with pytest.raises(InvalidArgument) as caught:
        write_output(str(link), b"attack")
    assert caught.value.reason == "output.symlink"
    assert link.is_symlink()
    assert victim.exists() != dangling
    if not dangling:
        assert victim.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        ["out"] if dangling else ["out", "victim"]
    )


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as caught:
        write_file(tmp_path, b"x")
    assert caught.value.reason == "output.not_a_file"
    assert list(tmp_path.iterdir()) == []


def test_dash_is_stdout(capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    write_output("-", b"to stdout")
    assert capfdbinary.readouterr().out == b"to stdout"
