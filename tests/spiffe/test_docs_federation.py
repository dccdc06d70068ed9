"""docs/spiffe.md's "Federation" blocks as written (issue 14, item 9), on loopback:

- `kmsctl spiffe federate --trust-domain home.arpa ...`, "another EdgeKMS federates with
  it": a second stack (trust domain office.example) federates the SPIFFE tests' stack
  (home.arpa), its bundle endpoint on the CA's HTTPS listener in place of
  `https://kms.home.arpa:8443`, the root from `kmsctl spiffe bundle --out` as the doc's
  paragraph says;
- `kmsctl spiffe federate --trust-domain other.example ...` and `unfederate` on the
  home.arpa stack, test_federation.py's stand-in SPIRE endpoint (HTTPS on loopback, its
  own TLS certificate) for `https://spire.other.example`;
- the `https_spiffe` line (`--endpoint-spiffe-id`, `--bundle`) on the home.arpa stack,
  test_federation_https_spiffe.py's stand-in SPIRE endpoint (an X509-SVID for
  spiffe://other.example/spire/server) for `https://spire.other.example:8443`, the
  bundle file written as `spire-server bundle show -format spiffe` would.
"""

from __future__ import annotations

import json
import shutil
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.doccommands import ROOT, block, lines, run_lines
from tests.e2e.conftest import KmsStack, start_stack, stop_stack
from tests.spiffe.conftest import SpiffeStack, wait_for
from tests.spiffe.test_federation import Foreign, foreign
from tests.spiffe.test_federation_https_spiffe import (
    Endpoint,
    SpiffeCA,
    bundle_json,
    endpoints,
    new_endpoint,
)

__all__ = ["endpoints", "foreign"]

FEDERATION = "## Federation"
DOC = "docs/spiffe.md"


@pytest.fixture
def office(tmp_path: Path) -> Iterator[KmsStack]:
    """Another EdgeKMS, trust domain office.example."""
    stack = start_stack(tmp_path / "office")
    try:
        with stack.client(timeout=60) as kms:
            kms.ca_init("Office CA")
            kms.spiffe_init("office.example")
        yield stack
    finally:
        assert stop_stack(stack) == 0


def shell(stack: KmsStack) -> dict[str, str]:
    return {**stack.env(), "PATH": f"{ROOT}/.venv/bin:/usr/bin:/bin"}


def test_spiffe_doc_federation_runs_as_written(
    spiffe_stack: SpiffeStack,
    foreign: Foreign,
    office: KmsStack,
    endpoints: list[Endpoint],
    tmp_path: Path,
) -> None:
    home = spiffe_stack.stack
    # The doc's paragraph: the peer trusts the endpoint with our root.
    run_lines(["kmsctl spiffe bundle --out home.arpa-root.pem"], tmp_path, shell(home))
    url = f"{spiffe_stack.https_url}/spiffe/bundle"
    context = ssl.create_default_context(cafile=str(tmp_path / "home.arpa-root.pem"))

    def served() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=10, context=context):  # noqa: S310 - loopback
                return True
        except OSError:
            return False  # the listener starts once the CA has issued its certificate

    wait_for(served, 90, "home.arpa's bundle endpoint over HTTPS")
    (by_office,) = lines(
        block(DOC, FEDERATION, 0).text.replace("https://kms.home.arpa:8443", spiffe_stack.https_url)
    )
    ran = run_lines([by_office], tmp_path, shell(office))
    assert "home.arpa" in ran[0].out
    with office.client() as kms:
        federated = {f.trust_domain for f in kms.spiffe_bundle().federated}
    assert federated == {"home.arpa"}

    shutil.copy(foreign.tls_ca, tmp_path / "other-endpoint-ca.pem")
    (trusting,) = lines(
        block(DOC, FEDERATION, 1).text.replace("https://spire.other.example", foreign.url)
    )
    (stopping,) = lines(block(DOC, FEDERATION, 3).text)
    ran = run_lines([trusting], tmp_path, shell(home))
    assert "other.example" in ran[0].out
    with home.client() as kms:
        bundle = kms.spiffe_bundle()
    other = next(f for f in bundle.federated if f.trust_domain == "other.example")
    assert {k["kid"] for k in json.loads(other.jwks)["keys"]} == {foreign.kid}

    # The same domain again, over https_spiffe: its SPIRE server's SVID and bundle.
    spire = SpiffeCA.make("other.example SPIRE")
    spire_bundle = bundle_json([spire], sequence=3, hint=300)
    (tmp_path / "other.example.bundle.json").write_bytes(spire_bundle)
    endpoint = new_endpoint(
        endpoints, tmp_path / "spire", *spire.leaf("spiffe://other.example/spire/server"),
        spire_bundle,
    )  # fmt: skip
    (over_spiffe,) = lines(
        block(DOC, FEDERATION, 2).text.replace(
            "https://spire.other.example:8443", endpoint.url.rstrip("/")
        )
    )
    ran = run_lines([over_spiffe], tmp_path, shell(home))
    assert "other.example (https_spiffe)" in ran[0].out
    with home.client() as kms:
        other = next(f for f in kms.spiffe_bundle().federated if f.trust_domain == "other.example")
    assert list(other.x509_authorities_der) == [spire.der]
    run_lines([stopping], tmp_path, shell(home))
    with home.client() as kms:
        assert "other.example" not in {f.trust_domain for f in kms.spiffe_bundle().federated}
