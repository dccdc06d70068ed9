"""What keeps `kmsctl` quick to start (issue 14, item 6; docs/performance.md, "kmsctl
start-up") without changing what it does: the digest of a file to sign comes from
hashlib, equal to cryptography's for every hashed scheme, and the console script's fast
exit still runs atexit handlers, flushes every byte, keeps the exit code and waits for a
thread the program left running."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import hashes

from edgekms.algorithms import ALGORITHMS, AlgorithmInfo
from mgmt.cli import cli
from mgmt.cli.keys import _CHUNK, _wire_data

HASHED = [a for a in ALGORITHMS.values() if a.hash_name is not None]


@pytest.mark.parametrize("ainfo", HASHED, ids=lambda a: a.cli_name)
def test_file_digest_is_cryptographys(ainfo: AlgorithmInfo) -> None:
    """Three chunks and a bit, so the streaming update is exercised too."""
    data = bytes(range(256)) * (3 * _CHUNK // 256) + b"tail"
    expected = hashes.Hash(ainfo.hash())
    expected.update(data)
    digest = _wire_data(ainfo, io.BytesIO(data))
    assert digest == expected.finalize()
    assert len(digest) == ainfo.digest_size


def _main(tmp_path: Path, *args: str, before: str = "") -> subprocess.CompletedProcess[bytes]:
    """The console script's main() in a fresh interpreter, with an atexit handler that
    appends a line to a file (so a handler run twice or never shows)."""
    marker = tmp_path / "atexit.txt"
    code = "\n".join(
        [
            "import atexit, sys",
            f"atexit.register(lambda: open({str(marker)!r}, 'a').write('ran\\n'))",
            before,
            f"sys.argv = ['kmsctl', *{list(args)!r}]",
            "from mgmt.cli import main",
            "main()",
        ]
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)


def test_fast_exit_flushes_all_output_and_runs_atexit_once(tmp_path: Path) -> None:
    # The bash completion script, smaller than stdout's buffer on a pipe: all of it is
    # still in the buffer when main() ends, and lost unless the exit flushes it.
    expected = CliRunner().invoke(cli, ["completion", "bash"])
    assert expected.exit_code == 0 and "complete" in expected.output
    done = _main(tmp_path, "completion", "bash")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == expected.output
    assert (tmp_path / "atexit.txt").read_text() == "ran\n"


def test_fast_exit_keeps_the_exit_code_and_the_error_text(tmp_path: Path) -> None:
    done = _main(tmp_path, "no-such-command")
    assert done.returncode == 2
    assert b"No such command 'no-such-command'" in done.stderr
    assert (tmp_path / "atexit.txt").read_text() == "ran\n"


def test_exit_waits_for_a_thread_left_running(tmp_path: Path) -> None:
    """A non-daemon thread still working when the command returns: the ordinary exit
    (which joins it) is taken, so its work is finished when the process has gone."""
    finished = tmp_path / "thread.txt"
    # The thread sleeps so that it is surely alive when main() ends; the assertion does
    # not depend on how long that takes: an exit that did not join it leaves no file.
    before = "\n".join(
        [
            "import threading, time",
            "def work():",
            "    time.sleep(1)",
            f"    open({str(finished)!r}, 'w').write('done')",
            "threading.Thread(target=work).start()",
        ]
    )
    done = _main(tmp_path, "--version", before=before)
    assert done.returncode == 0, done.stderr
    assert b"kmsctl" in done.stdout
    assert finished.read_text() == "done"
    assert (tmp_path / "atexit.txt").read_text() == "ran\n"


def test_only_short_lived_runs_go_without_the_cycle_collector() -> None:
    """The cycle collector is switched off only for one-request commands and TABs: a
    long-running `kmsctl up` or `agent run` with it off would keep every cycle forever."""
    from mgmt.cli import _short_lived

    assert _short_lived(["key", "sign", "web"], {})
    assert _short_lived([], {"_KMSCTL_COMPLETE": "bash_complete"})
    for args in (["up"], ["agent", "run"], ["audit", "tail", "--follow"], [], ["--help"]):
        assert not _short_lived(args, {}), args


def test_a_key_command_runs_without_the_cycle_collector_and_up_with_it(tmp_path: Path) -> None:
    """Observed in the real console script's process: `key --help` (a key command that
    needs no stack) runs with gc off, `up --help` with it on."""
    seen = tmp_path / "gc.txt"
    before = (
        f"import gc; atexit.register(lambda: open({str(seen)!r}, 'a').write(str(gc.isenabled())))"
    )
    for args, expected in ((["key", "--help"], "False"), (["up", "--help"], "True")):
        seen.unlink(missing_ok=True)
        done = _main(tmp_path, *args, before=before)
        assert done.returncode == 0, done.stderr
        assert seen.read_text() == expected, args
