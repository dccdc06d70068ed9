"""yocto-layer/scripts/go-mods-inc.py on a small Go program and a module in a real git
repository: it writes the recipe's module SRC_URI, licences and vendor/modules.txt,
and refuses a module whose source does not match go.sum."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "yocto-layer" / "scripts" / "go-mods-inc.py"

DEP_FILES = {
    "go.mod": "module example.com/dep\n\ngo 1.20\n",
    "LICENSE": "Permission is granted.\n",
    "sub/sub.go": 'package sub\n\nimport (\n\t"fmt"\n\tx "example.com/dep/internal/x"\n)\n\n'
    "func S() { fmt.Println(x.X) }\n",
    "sub/sub_test.go": 'package sub\n\nimport "example.com/dep/testonly"\n\nvar _ = testonly.T\n',
    "internal/x/x.go": "package x\n\nconst X = 1\n",
    "testonly/t.go": "package testonly\n\nconst T = 1\n",
    "unused/u.go": "package unused\n",
    # A nested module is not part of this module's zip (nor of its hash).
    "nested/go.mod": "module example.com/dep/nested\n",
    "nested/n.go": "package nested\n",
}
MAIN_FILES = {
    "go.mod": "module example.com/main\n\ngo 1.22\n\nrequire example.com/dep v1.0.0\n",
    "main.go": 'package main\n\nimport "example.com/dep/sub"\n\nfunc main() { sub.S() }\n',
}


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def git(root: Path, *args: str) -> str:
    env_args = ["-c", "user.name=t", "-c", "user.email=t@example.com"]
    return subprocess.run(
        ["git", "-C", str(root), *env_args, *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def h1(module: str, version: str, files: dict[str, str]) -> str:
    """go.sum's h1: per golang.org/x/mod/sumdb/dirhash.Hash1, written out from its spec."""
    lines = "".join(
        f"{hashlib.sha256(files[name].encode()).hexdigest()}  {module}@{version}/{name}\n"
        for name in sorted(files)
    )
    return "h1:" + base64.b64encode(hashlib.sha256(lines.encode()).digest()).decode()


def setup(tmp_path: Path, go_sum_hash: str | None = None) -> tuple[Path, Path, str]:
    dep = tmp_path / "dep"
    write(dep, DEP_FILES)
    git(dep, "init", "-q")
    git(dep, "add", ".")
    git(dep, "commit", "-q", "-m", "v1.0.0")
    commit = git(dep, "rev-parse", "HEAD")
    zipped = {k: v for k, v in DEP_FILES.items() if not k.startswith("nested/")}
    main = tmp_path / "main"
    write(main, MAIN_FILES)
    digest = go_sum_hash or h1("example.com/dep", "v1.0.0", zipped)
    (main / "go.sum").write_text(f"example.com/dep v1.0.0 {digest}\n")
    return main, dep, commit


def run(main: Path, dep: Path, out: Path) -> subprocess.CompletedProcess[str]:
    out.mkdir(exist_ok=True)
    return subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--main",
            str(main),
            "--name",
            "prog",
            "--out-dir",
            str(out),
            "--module",
            f"example.com/dep={dep}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_writes_src_uri_licences_and_modules_txt(tmp_path: Path) -> None:
    main, dep, commit = setup(tmp_path)
    out = tmp_path / "recipe"
    result = run(main, dep, out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok example.com/dep v1.0.0 h1:")
    inc = (out / "prog-go-mods.inc").read_text()
    assert "git://example.com/dep;name=example-com-dep;" in inc
    assert "destsuffix=git/src/import/vendor.fetch/example.com/dep@v1.0.0;" in inc
    assert ";go_module_path=example.com/dep;is_go_dependency=1" in inc
    assert f'SRCREV_example-com-dep = "{commit}"' in inc
    licence_md5 = hashlib.md5(DEP_FILES["LICENSE"].encode(), usedforsecurity=False).hexdigest()
    assert (
        f"example.com/dep@v1.0.0/LICENSE;md5={licence_md5}"
        in (out / "prog-licenses.inc").read_text()
    )
    # What `go mod vendor` keeps: packages the program reaches, not dependencies' tests.
    assert (out / "files" / "modules.txt").read_text() == (
        "# example.com/dep v1.0.0\n"
        "## explicit; go 1.20\n"
        "example.com/dep/internal/x\n"
        "example.com/dep/sub\n"
    )


def test_refuses_a_module_that_is_not_what_go_sum_pinned(tmp_path: Path) -> None:
    wrong = h1("example.com/dep", "v1.0.0", {"go.mod": "module example.com/dep\n"})
    main, dep, _ = setup(tmp_path, go_sum_hash=wrong)
    out = tmp_path / "recipe"
    result = run(main, dep, out)
    assert result.returncode == 1
    assert result.stdout.startswith(
        f"MISMATCH example.com/dep v1.0.0: go.sum {wrong}, checkout h1:"
    )
    assert not (out / "prog-go-mods.inc").exists()
