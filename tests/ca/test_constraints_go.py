"""Name constraints in a third verifier: Go's crypto/x509 (`tests/ca/goverify`, standard
library only, built in GOPATH mode with nothing to download). The same constrained
intermediate as `test_constraints.py`: a leaf inside verifies for its name, and leaves
signed straight with the intermediate key outside the CA's own check (a name outside
the permitted subtrees, an IP outside, an excluded name) are refused by Go on its own
with a name-constraint error. Go is installed by scripts/bootstrap.sh (golang-go); if it
is missing this fails rather than skips, so the check cannot silently vanish."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from ca_service.builder import build_intermediate, ca_name
from edgekms import nameconstraints as constraints
from tests.ca.helpers import make_key, make_soft_ca
from tests.ca.test_constraints import HOME, leaf_for, pem

GOVERIFY_SRC = Path(__file__).parent / "goverify" / "main.go"


@pytest.fixture(scope="module")
def goverify(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The verifier built once per module, with Go's cache and GOPATH on a temp dir."""
    go = shutil.which("go")
    assert go is not None, "Go is missing: scripts/bootstrap.sh installs golang-go"
    work = tmp_path_factory.mktemp("goverify")
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOFLAGS": "",
        "GOCACHE": str(work / "cache"),
        "GOPATH": str(work / "gopath"),
    }
    binary = work / "goverify"
    built = subprocess.run(
        [go, "build", "-o", str(binary), str(GOVERIFY_SRC)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    return binary


def go_verify(
    binary: Path,
    root: x509.Certificate,
    inter: x509.Certificate,
    leaf: x509.Certificate,
    dns_name: str,
    tmp: Path,
) -> subprocess.CompletedProcess[str]:
    """Go's x509.Certificate.Verify of leaf <- inter <- root for dns_name (serverAuth)."""
    paths = []
    for name, cert in (("root", root), ("inter", inter), ("leaf", leaf)):
        path = tmp / f"go-{name}.pem"
        path.write_bytes(pem(cert))
        paths.append(str(path))
    return subprocess.run(
        [str(binary), *paths, dns_name],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_constrained_chain_in_go(goverify: Path, tmp_path: Path) -> None:
    soft = make_soft_ca()
    inter_key = make_key("ec-p256")
    inter = build_intermediate(
        soft.root_key,
        soft.root,
        inter_key.public_key(),
        ca_name("Home Issuing CA"),
        1825,
        name_constraints=constraints.build(HOME),
    )
    assert inter.extensions.get_extension_for_class(x509.NameConstraints).critical

    inside = leaf_for(inter_key, inter, "nas.home.arpa", ("dns:nas.home.arpa", "ip:192.168.1.10"))
    ok = go_verify(goverify, soft.root, inter, inside, "nas.home.arpa", tmp_path)
    assert ok.returncode == 0 and ok.stdout.strip() == "OK", ok.stdout + ok.stderr

    # The same chain for a name the leaf does not carry fails on the hostname, not on
    # constraints: the name-constraint errors below are Go's answer to the constraint.
    wrong = go_verify(goverify, soft.root, inter, inside, "other.home.arpa", tmp_path)
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    assert "valid for nas.home.arpa, not other.home.arpa" in wrong.stdout, wrong.stdout
    assert "constraint" not in wrong.stdout, wrong.stdout

    for cn, sans, verify_as, why in [
        (
            "www.google.com",
            ("dns:www.google.com",),
            "www.google.com",
            'DNS name "www.google.com" is not permitted by any constraint',
        ),
        (
            "nas.home.arpa",
            ("dns:nas.home.arpa", "ip:8.8.8.8"),
            "nas.home.arpa",
            'IP address "8.8.8.8" is not permitted by any constraint',
        ),
        (
            "x.bad.home.arpa",
            ("dns:x.bad.home.arpa",),
            "x.bad.home.arpa",
            'DNS name "x.bad.home.arpa" is excluded by constraint "bad.home.arpa"',
        ),
    ]:
        outside = leaf_for(inter_key, inter, cn, sans)
        res = go_verify(goverify, soft.root, inter, outside, verify_as, tmp_path)
        out = res.stdout + res.stderr
        assert res.returncode == 1, out
        assert "not authorized to sign for this name" in res.stdout, out
        assert why in res.stdout, out
