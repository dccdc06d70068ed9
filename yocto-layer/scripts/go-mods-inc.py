#!/usr/bin/env python3
"""Write the SRC_URI of a Go recipe's modules (for scarthgap's go-vendor class) from
go.mod/go.sum, checking every module's source against go.sum before trusting it.

Why: scarthgap has no gomod:// fetcher, and `recipetool create` resolves modules over
the network. This does the same offline from git checkouts of the module repositories
(one per module, at its tag), so a Go recipe fetches everything in do_fetch and builds
with -mod=vendor and no network. It writes three files next to the recipe:

  <name>-go-mods.inc      one git SRC_URI and one SRCREV per module
  <name>-licenses.inc     LIC_FILES_CHKSUM of every module's licence file
  files/modules.txt       vendor/modules.txt as `go mod vendor` would write it

A module whose go.sum hash (h1:, the sha256 "dirhash" of the module zip) does not match
its checkout is an error: the recipe would otherwise vendor other code than upstream
pinned. A checkout missing file contents (a partial mirror) is reported as unverified.

usage: go-mods-inc.py --main DIR --name nats-server --out-dir RECIPE_DIR \
           --module github.com/klauspost/compress=DIR ...
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

VENDOR_FETCH = "git/src/import/vendor.fetch"
# Module path prefixes served from a vanity host, and the git repository behind them.
VANITY = {
    "golang.org/x/": "go.googlesource.com/",
    "go.uber.org/": "github.com/uber-go/",
    "gopkg.in/": "github.com/go-yaml/",
}
GO_FILE_IMPORT = re.compile(r'^\s*(?:[A-Za-z_.]\w*\s+)?"([^"]+)"', re.M)
IMPORT_BLOCK = re.compile(r"^import\s*\((.*?)\)", re.M | re.S)
IMPORT_LINE = re.compile(r'^import\s+(?:[A-Za-z_.]\w*\s+)?"([^"]+)"', re.M)


@dataclass
class Module:
    """One `require` of go.mod and where its source sits."""

    path: str
    version: str
    checkout: Path
    repo: str = ""  # repository path (host/owner/name) the module lives in
    subdir: str = ""  # the module's directory inside the repository ("" = root)
    go_version: str = ""
    packages: set[str] = field(default_factory=set)

    @property
    def root(self) -> Path:
        return self.checkout / self.subdir if self.subdir else self.checkout


def parse_go_mod(text: str) -> tuple[str, list[tuple[str, str]], str]:
    """module path, requires (path, version), go directive."""
    module = re.search(r"^module\s+(\S+)", text, re.M)
    go = re.search(r"^go\s+(\S+)", text, re.M)
    requires: list[tuple[str, str]] = []
    for block in re.findall(r"^require\s*\((.*?)\)", text, re.M | re.S):
        requires += re.findall(r"^\s*(\S+)\s+(\S+)", block, re.M)
    requires += re.findall(r"^require\s+([^\s(]+)\s+(\S+)", text, re.M)
    return (module.group(1) if module else "", requires, go.group(1) if go else "")


def repo_of(path: str) -> tuple[str, str]:
    """(repository path, subdirectory) of a module path, e.g. jwt/v2 -> (jwt, v2)."""
    repo = path
    for prefix, host in VANITY.items():
        if path.startswith(prefix):
            name = path[len(prefix) :]
            repo = host + (name.split(".v")[0] if prefix == "gopkg.in/" else name)
    major = re.search(r"/(v[2-9]\d*)$", repo)
    if major:
        return repo[: major.start()], major.group(1)
    return repo, ""


def git(checkout: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(checkout), *args], capture_output=True, text=True, check=True
    ).stdout


def module_files(module: Module) -> list[str] | None:
    """Files of the module zip (relative to its root), or None if a blob is missing.

    The zip holds the module directory minus VCS data, nested modules (directories with
    their own go.mod) and vendor/ directories; a module in a subdirectory also gets the
    repository's LICENSE if it has none of its own."""
    listing = git(module.checkout, "ls-files", "-s", "--", module.subdir or ".")
    files: list[str] = []
    nested: set[str] = set()
    for line in listing.splitlines():
        mode, _, _, name = line.split(None, 3)
        rel = name[len(module.subdir) + 1 :] if module.subdir else name
        if rel.endswith("/go.mod") and rel != "go.mod":
            nested.add(rel[: -len("/go.mod")] + "/")
        if mode.startswith("12") or mode.startswith("16"):
            continue  # symlinks and submodules are not in module zips
        files.append(rel)
    files = [
        f
        for f in files
        if not any(f.startswith(n) for n in nested) and not re.search(r"(^|/)vendor/", f)
    ]
    for rel in files:
        if not (module.root / rel).is_file():
            return None
    if module.subdir and "LICENSE" not in files and (module.checkout / "LICENSE").is_file():
        files.append("LICENSE")
    return sorted(files)


def dirhash(module: Module, files: list[str]) -> str:
    """go.sum's h1: the sha256 of "sha256(file)  module@version/path" lines."""
    summary = hashlib.sha256()
    prefix = f"{module.path}@{module.version}/"
    for rel in files:
        source = module.root / rel if (module.root / rel).is_file() else module.checkout / rel
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        summary.update(f"{digest}  {prefix}{rel}\n".encode())
    return "h1:" + base64.b64encode(summary.digest()).decode()


def imports_of(directory: Path, tests: bool) -> set[str]:
    """Every import of the .go files in one directory (all build tags, like go mod vendor)."""
    found: set[str] = set()
    for source in directory.glob("*.go"):
        if source.name.endswith("_test.go") and not tests:
            continue
        text = source.read_text(errors="replace")
        if re.search(r"^//go:build ignore\s*$", text, re.M):
            continue
        for block in IMPORT_BLOCK.findall(text):
            found.update(GO_FILE_IMPORT.findall(block))
        found.update(IMPORT_LINE.findall(text))
    return found


def owner(package: str, modules: list[Module]) -> Module | None:
    best = None
    for module in modules:
        inside = package == module.path or package.startswith(module.path + "/")
        if inside and (best is None or len(module.path) > len(best.path)):
            best = module
    return best


def resolve_packages(main_dir: Path, main_path: str, modules: list[Module]) -> None:
    """Fill Module.packages with every package the main module (tests included) reaches."""
    todo: list[str] = []
    for directory in {p.parent for p in main_dir.rglob("*.go")}:
        rel = directory.relative_to(main_dir).as_posix()
        if "/testdata" in f"/{rel}" or rel.startswith("vendor"):
            continue
        todo += sorted(imports_of(directory, tests=True))
    seen: set[str] = set()
    while todo:
        package = todo.pop()
        if package in seen or package == "C" or "." not in package.split("/")[0]:
            continue
        seen.add(package)
        if package == main_path or package.startswith(main_path + "/"):
            continue
        module = owner(package, modules)
        if module is None:
            raise SystemExit(f"no module provides {package}")
        directory = module.root / package[len(module.path) :].lstrip("/")
        if not any(directory.glob("*.go")):
            raise SystemExit(f"{package}: no Go files in {directory}")
        module.packages.add(package)
        todo += sorted(imports_of(directory, tests=False))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--main", type=Path, required=True, help="checkout of the program")
    parser.add_argument("--name", required=True, help="recipe name (file prefix)")
    parser.add_argument("--out-dir", type=Path, required=True, help="the recipe's directory")
    parser.add_argument("--module", action="append", default=[], help="PATH=CHECKOUT")
    args = parser.parse_args()

    main_path, requires, _ = parse_go_mod((args.main / "go.mod").read_text())
    sums = dict(re.findall(r"^(\S+ \S+) (h1:\S+)$", (args.main / "go.sum").read_text(), re.M))
    checkouts = dict(item.split("=", 1) for item in args.module)
    modules: list[Module] = []
    for path, version in requires:
        if path not in checkouts:
            raise SystemExit(f"no checkout given for {path} (--module {path}=DIR)")
        repo, subdir = repo_of(path)
        module = Module(path, version, Path(checkouts[path]), repo, subdir)
        go_mod = module.root / "go.mod"  # old modules have none: no go directive then
        module.go_version = parse_go_mod(go_mod.read_text())[2] if go_mod.is_file() else ""
        modules.append(module)

    status = 0
    for module in modules:
        files = module_files(module)
        want = sums.get(f"{module.path} {module.version}")
        if files is None:
            print(f"UNVERIFIED {module.path} {module.version}: the checkout lacks file contents")
            continue
        got = dirhash(module, files)
        if got != want:
            print(f"MISMATCH {module.path} {module.version}: go.sum {want}, checkout {got}")
            status = 1
        else:
            print(f"ok {module.path} {module.version} {got}")
    if status:
        return status

    resolve_packages(args.main, main_path, modules)
    modules.sort(key=lambda m: m.path)

    lines = [
        "# Generated by yocto-layer/scripts/go-mods-inc.py from go.mod/go.sum: do not edit.",
        "# Every Go module nats-server needs, fetched by do_fetch and vendored by go-vendor.",
        "# go-vendor.bbclass reads go_module_path, go_subdir and is_go_dependency.",
        "# nooelint: oelint.vars.srcurioptions, oelint.vars.srcuridomains",
        'SRC_URI += "\\',
    ]
    srcrevs = []
    licences = [
        "# Generated by yocto-layer/scripts/go-mods-inc.py: the licence of every vendored module.",
        'LIC_FILES_CHKSUM += "\\',
    ]
    modules_txt = []
    for module in modules:
        # SRC_URI names: letters, digits and '-' only (oelint reads dots as overrides).
        name = re.sub(r"[^A-Za-z0-9]+", "-", module.path)
        dest = f"{VENDOR_FETCH}/{module.repo}@{module.version}"
        uri = (
            f"git://{module.repo};name={name};protocol=https;nobranch=1;destsuffix={dest}"
            f";go_module_path={module.path}"
        )
        if module.subdir:
            uri += f";go_subdir={module.subdir}"
        lines.append(f"    {uri};is_go_dependency=1 \\")
        commit = git(module.checkout, "rev-parse", "HEAD").strip()
        srcrevs.append(f'SRCREV_{name} = "{commit}"')
        licence = module.root / "LICENSE"
        if not licence.is_file():
            licence = module.checkout / "LICENSE"
        rel = licence.relative_to(module.checkout).as_posix()
        # LIC_FILES_CHKSUM takes md5: a change detector, not a security boundary.
        md5 = hashlib.md5(licence.read_bytes(), usedforsecurity=False).hexdigest()
        licences.append(
            f"    file://src/import/vendor.fetch/{module.repo}@{module.version}/{rel};md5={md5} \\"
        )
        modules_txt.append(f"# {module.path} {module.version}")
        modules_txt.append(
            f"## explicit; go {module.go_version}" if module.go_version else "## explicit"
        )
        modules_txt += sorted(module.packages)
    lines += ['"', "", *srcrevs, ""]
    licences += ['"', ""]
    (args.out_dir / f"{args.name}-go-mods.inc").write_text("\n".join(lines))
    (args.out_dir / f"{args.name}-licenses.inc").write_text("\n".join(licences))
    (args.out_dir / "files").mkdir(exist_ok=True)
    (args.out_dir / "files" / "modules.txt").write_text("\n".join(modules_txt) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
