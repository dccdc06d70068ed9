"""The key-name cache behind TAB completion (mgmt/cli/completion.py): private to its
user, per client config, narrowed as the word grows, and gone after CACHE_SECONDS."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from mgmt.cli import completion


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_names_are_kept_private_and_narrowed(cache_home: Path, tmp_path: Path) -> None:
    cache = completion._cache_file(tmp_path / "a" / "config.toml")
    assert cache.parent == cache_home / "edgekms"
    completion._keep_names(cache, "app/", ["app/one", "app/two", "app/three"])
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert stat.S_IMODE(cache.parent.stat().st_mode) == 0o700
    assert completion._cached_names(cache, "app/t") == ["app/two", "app/three"]
    assert completion._cached_names(cache, "app/") == ["app/one", "app/two", "app/three"]
    # A shorter word, or another one, was not asked: the broker must be.
    assert completion._cached_names(cache, "ap") is None
    assert completion._cached_names(cache, "nas/") is None


def test_another_config_has_its_own_cache(cache_home: Path, tmp_path: Path) -> None:
    one = completion._cache_file(tmp_path / "a" / "config.toml")
    other = completion._cache_file(tmp_path / "b" / "config.toml")
    assert one != other
    completion._keep_names(one, "", ["k1"])
    assert completion._cached_names(other, "") is None


def test_names_expire(cache_home: Path, tmp_path: Path) -> None:
    cache = completion._cache_file(tmp_path / "config.toml")
    completion._keep_names(cache, "", ["k1"])
    old = time.time() - completion.CACHE_SECONDS - 1
    os.utime(cache, (old, old))
    assert completion._cached_names(cache, "k") is None


@pytest.mark.parametrize("content", ["", "not json", '{"prefix": 3, "names": []}', "[]"])
def test_a_damaged_cache_is_ignored(cache_home: Path, tmp_path: Path, content: str) -> None:
    cache = completion._cache_file(tmp_path / "config.toml")
    cache.parent.mkdir(parents=True)
    cache.write_text(content)
    assert completion._cached_names(cache, "k") is None


def test_a_cached_tab_imports_neither_grpc_nor_cryptography(tmp_path: Path) -> None:
    """A TAB on a key name answered from the cache loads the `key` commands but none of
    grpc, nats or cryptography: what keeps it near the interpreter's own start-up."""
    import ast
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from click.shell_completion import ShellComplete\n"
        "import mgmt.cli\n"
        "from mgmt.cli import completion\n"
        f"data = Path({str(tmp_path / 'data')!r})\n"
        "cache = completion._cache_file(data / 'client' / 'config.toml')\n"
        "completion._keep_names(cache, 'app/', ['app/one', 'nas/x'])\n"
        "comp = ShellComplete(mgmt.cli.cli, {}, 'kmsctl', '_KMSCTL_COMPLETE')\n"
        "items = comp.get_completions(['key', 'sign', '--data-dir', str(data)], 'app/o')\n"
        "assert [i.value for i in items] == ['app/one'], items\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'grpc', 'nats', 'cryptography'}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")},
    ).stdout
    assert ast.literal_eval(out) == []
