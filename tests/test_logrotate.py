"""Log rotation by size and count (mgmt.logrotate, issue 14 item 4), on real files: the
newest copy is `<name>.1`, at most `backups` copies are kept, a log under the limit is
left alone, and with no copies kept the log is only truncated. The supervisor's use of
it on a live stack, and a full log directory, are in tests/e2e/test_logs.py."""

from __future__ import annotations

from pathlib import Path

from mgmt.logrotate import rotate_all, rotate_if_big


def _fill(path: Path, text: str, size: int) -> None:
    with path.open("a") as log:
        log.write((text + "\n") * (size // (len(text) + 1) + 1))


def test_the_newest_copy_is_dot_one_and_the_count_is_kept(tmp_path: Path) -> None:
    log = tmp_path / "broker.log"
    for generation in ("first", "second", "third", "fourth"):
        _fill(log, generation, 2048)
        done = rotate_if_big(log, 1024, 2)
        assert done is not None and done.kept and done.size >= 2048
        assert log.stat().st_size == 0  # truncated in place: the child's fd stays valid
    assert (tmp_path / "broker.log.1").read_text().startswith("fourth\n")
    assert (tmp_path / "broker.log.2").read_text().startswith("third\n")
    assert not (tmp_path / "broker.log.3").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "broker.log",
        "broker.log.1",
        "broker.log.2",
    ]


def test_a_log_under_the_limit_or_missing_is_left_alone(tmp_path: Path) -> None:
    log = tmp_path / "ca.log"
    _fill(log, "small", 100)
    before = log.read_bytes()
    assert rotate_if_big(log, 1024, 5) is None
    assert log.read_bytes() == before
    assert rotate_if_big(tmp_path / "absent.log", 1024, 5) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.log"]


def test_no_copies_kept_means_truncated_only(tmp_path: Path) -> None:
    log = tmp_path / "crypto-hsm0.log"
    _fill(log, "line", 4096)
    done = rotate_if_big(log, 1024, 0)
    assert done is not None and not done.kept
    assert log.stat().st_size == 0
    assert [p.name for p in tmp_path.iterdir()] == ["crypto-hsm0.log"]


def test_rotate_all_takes_every_big_log_and_nothing_else(tmp_path: Path) -> None:
    _fill(tmp_path / "big.log", "x" * 80, 4096)
    _fill(tmp_path / "small.log", "y", 10)
    _fill(tmp_path / "notes.txt", "z" * 80, 4096)  # not a log of the stack's
    done = rotate_all(tmp_path, 1024, 3)
    assert [r.path.name for r in done] == ["big.log"]
    assert (tmp_path / "big.log.1").exists()
    assert not (tmp_path / "small.log.1").exists() and not (tmp_path / "notes.txt.1").exists()
