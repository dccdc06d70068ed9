"""Name constraints: a constrained intermediate (critical NameConstraints) whose leaves
verify in openssl and GnuTLS's certtool, a name outside refused by the CA before
signing, and the same name, signed outside the CA's check straight with the issuing key,
rejected by both verifiers. Software keys for the pure logic, then the token over NATS."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_service.builder import CAKey, build_intermediate, build_leaf, ca_name, random_serial
from ca_service.policy import load_csr, plan_from_csr
from ca_service.profiles import BUILTIN_PROFILES
from edgekms import nameconstraints as constraints
from edgekms.errors import InvalidArgument
from edgekms.v1 import ca_pb2
from edgekms.v1 import common_pb2 as pb
from tests.ca.conftest import PROVIDER, CAEnv
from tests.ca.helpers import make_csr, make_key, make_soft_ca
from tests.ca.lint import pkilint_findings

HOME = ca_pb2.NameConstraints(
    permitted_dns=["home.arpa"], permitted_ip=["192.168.0.0/16"], excluded_dns=["bad.home.arpa"]
)
needs_certtool = pytest.mark.skipif(shutil.which("certtool") is None, reason="needs gnutls-bin")


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def leaf_for(
    key: CAKey, issuer: x509.Certificate, cn: str, sans: tuple[str, ...]
) -> x509.Certificate:
    """Signed straight with the issuing key: no constraint check on this path."""
    plan = plan_from_csr(
        BUILTIN_PROFILES["https-server"],
        load_csr(make_csr(make_key("ec-p256"), cn=cn, sans=sans)),
    )
    return build_leaf(key, issuer, plan, random_serial())


def verifiers(
    root: x509.Certificate, inter: x509.Certificate, leaf: x509.Certificate, tmp: Path
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """(openssl verify, certtool --verify) of leaf <- inter <- root."""
    (tmp / "root.pem").write_bytes(pem(root))
    (tmp / "inter.pem").write_bytes(pem(inter))
    (tmp / "leaf.pem").write_bytes(pem(leaf))
    (tmp / "chain.pem").write_bytes(pem(leaf) + pem(inter))
    ossl = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(tmp / "root.pem"),
            "-untrusted",
            str(tmp / "inter.pem"),
            str(tmp / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    gnutls = subprocess.run(
        [
            "certtool",
            "--verify",
            "--load-ca-certificate",
            str(tmp / "root.pem"),
            "--infile",
            str(tmp / "chain.pem"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return ossl, gnutls


def test_extension_is_built_checked_and_read_back() -> None:
    ext = constraints.build(HOME)
    assert ext is not None
    assert constraints.to_spec(ext) == ca_pb2.NameConstraints(
        permitted_dns=["home.arpa"], permitted_ip=["192.168.0.0/16"], excluded_dns=["bad.home.arpa"]
    )
    assert constraints.build(ca_pb2.NameConstraints()) is None

    def check(cn: str, *sans: str) -> None:
        csr = load_csr(make_csr(make_key("ec-p256"), cn=cn, sans=sans))
        plan = plan_from_csr(BUILTIN_PROFILES["https-server"], csr)
        constraints.check(ext, plan.subject, plan.san)

    check("nas.home.arpa", "dns:nas.home.arpa", "ip:192.168.1.10")
    check("", "dns:home.arpa")
    for cn, sans, bad in [
        ("www.google.com", ("dns:www.google.com",), "dns:www.google.com"),
        ("nas.home.arpa", ("dns:nas.home.arpa", "ip:10.0.0.1"), "ip:10.0.0.1"),
        ("nas.home.arpa", ("dns:nas.home.arpa", "ip:2001:db8::1"), "ip:2001:db8::1"),
        ("nas.home.arpa", ("dns:evilhome.arpa",), "dns:evilhome.arpa"),
        ("x.bad.home.arpa", ("dns:x.bad.home.arpa",), "dns:x.bad.home.arpa"),
        # A host-name CN is held against the constraints too (openssl and GnuTLS do).
        ("www.google.com", ("dns:nas.home.arpa",), "dns:www.google.com"),
    ]:
        with pytest.raises(InvalidArgument) as exc:
            check(cn, *sans)
        assert exc.value.reason == "csr.name_outside_constraints"
        assert exc.value.details["san"] == bad


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(ca_pb2.NameConstraints(permitted_dns=["Home..arpa"]), id="bad_dns"),
        pytest.param(ca_pb2.NameConstraints(permitted_ip=["192.168.1.1/16"]), id="host_bits"),
        pytest.param(ca_pb2.NameConstraints(permitted_ip=["home.arpa"]), id="not_a_network"),
        pytest.param(ca_pb2.NameConstraints(excluded_dns=["x.org"] * 65), id="too_many"),
    ],
)
def test_bad_constraints_are_typed(spec: ca_pb2.NameConstraints) -> None:
    with pytest.raises(InvalidArgument) as exc:
        constraints.build(spec)
    assert exc.value.reason == "ca.name_constraint_invalid"


@needs_certtool
def test_constrained_chain_in_openssl_and_gnutls(tmp_path: Path) -> None:
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
    ext = inter.extensions.get_extension_for_class(x509.NameConstraints)
    assert ext.critical
    assert pkilint_findings("cert", inter.public_bytes(serialization.Encoding.DER), tmp_path) == []

    inside = leaf_for(inter_key, inter, "nas.home.arpa", ("dns:nas.home.arpa", "ip:192.168.1.10"))
    ossl, gnutls = verifiers(soft.root, inter, inside, tmp_path)
    assert ossl.returncode == 0 and ": OK" in ossl.stdout, ossl.stdout + ossl.stderr
    assert gnutls.returncode == 0, gnutls.stdout + gnutls.stderr
    assert "Chain verification output: Verified." in gnutls.stdout

    for cn, sans in [
        ("www.google.com", ("dns:www.google.com",)),
        ("nas.home.arpa", ("dns:nas.home.arpa", "ip:8.8.8.8")),
    ]:
        outside = leaf_for(inter_key, inter, cn, sans)
        ossl, gnutls = verifiers(soft.root, inter, outside, tmp_path)
        assert ossl.returncode != 0, ossl.stdout
        assert "subtree violation" in ossl.stdout + ossl.stderr, ossl.stdout + ossl.stderr
        assert gnutls.returncode != 0, gnutls.stdout
        assert "Not verified" in gnutls.stdout and "constraints" in gnutls.stdout


@needs_certtool
async def test_constrained_ca_in_the_token(ca_env: CAEnv, tmp_path: Path) -> None:
    """`Init` with constraints over NATS; a name inside is issued and verifies; one
    outside is refused before signing (nothing stored), and the same leaf signed by the
    intermediate's token key outside the CA's check is rejected by openssl and GnuTLS."""
    init = await ca_env.call(
        "Init",
        ca_pb2.InitCARequest(
            provider=PROVIDER,
            key_type=pb.KEY_TYPE_EC_P256,
            common_name="Home CA",
            name_constraints=HOME,
        ),
        ca_pb2.InitCAResponse,
    )
    root = x509.load_der_x509_certificate(init.root_certificate_der)
    inter = x509.load_der_x509_certificate(init.intermediate_certificate_der)
    ext = inter.extensions.get_extension_for_class(x509.NameConstraints)
    assert ext.critical and constraints.to_spec(ext.value) == HOME

    def request(cn: str, *sans: str) -> ca_pb2.IssueCertificateRequest:
        csr = make_csr(make_key("ec-p256"), cn=cn, sans=sans)
        return ca_pb2.IssueCertificateRequest(profile="https-server", csr=csr, requester="admin")

    ok = await ca_env.call(
        "IssueCertificate",
        request("nas.home.arpa", "dns:nas.home.arpa", "ip:192.168.1.10"),
        ca_pb2.IssueCertificateResponse,
    )
    leaf = x509.load_der_x509_certificate(ok.certificate_der)
    ossl, gnutls = await asyncio.to_thread(verifiers, root, inter, leaf, tmp_path)
    assert ossl.returncode == 0 and gnutls.returncode == 0

    before = await ca_env.record_count()
    with pytest.raises(InvalidArgument) as exc:
        await ca_env.call(
            "IssueCertificate",
            request("www.google.com", "dns:www.google.com"),
            ca_pb2.IssueCertificateResponse,
        )
    assert exc.value.reason == "csr.name_outside_constraints"
    assert await ca_env.record_count() == before

    issuer = await ca_env.ca.issuer()
    forged = await asyncio.to_thread(
        leaf_for, issuer.key, issuer.cert, "www.google.com", ("dns:www.google.com",)
    )
    ossl, gnutls = await asyncio.to_thread(verifiers, root, inter, forged, tmp_path)
    assert ossl.returncode != 0 and "subtree violation" in ossl.stdout + ossl.stderr
    assert gnutls.returncode != 0 and "Not verified" in gnutls.stdout


async def test_rotation_sets_new_constraints_or_clears_them(ca_env: CAEnv) -> None:
    """Constraints at rotation: the new intermediate carries the new ones and the CA
    checks against them from then on; --clear-name-constraints drops them."""
    await ca_env.call(
        "Init",
        ca_pb2.InitCARequest(
            provider=PROVIDER,
            key_type=pb.KEY_TYPE_EC_P256,
            common_name="Home CA",
            name_constraints=HOME,
        ),
        ca_pb2.InitCAResponse,
    )
    office = ca_pb2.NameConstraints(permitted_dns=["office.example"], permitted_ip=["10.0.0.0/8"])
    rotated = await ca_env.call(
        "Rotate", ca_pb2.RotateCARequest(name_constraints=office), ca_pb2.RotateCAResponse
    )
    inter = x509.load_der_x509_certificate(rotated.intermediate_certificate_der)
    ext = inter.extensions.get_extension_for_class(x509.NameConstraints)
    assert ext.critical and constraints.to_spec(ext.value) == office

    def request(name: str) -> ca_pb2.IssueCertificateRequest:
        csr = make_csr(make_key("ec-p256"), cn=name, sans=(f"dns:{name}",))
        return ca_pb2.IssueCertificateRequest(profile="https-server", csr=csr, requester="admin")

    await ca_env.call(
        "IssueCertificate", request("pc.office.example"), ca_pb2.IssueCertificateResponse
    )
    with pytest.raises(InvalidArgument) as exc:
        await ca_env.call(
            "IssueCertificate", request("nas.home.arpa"), ca_pb2.IssueCertificateResponse
        )
    assert exc.value.reason == "csr.name_outside_constraints"

    cleared = await ca_env.call(
        "Rotate", ca_pb2.RotateCARequest(clear_name_constraints=True), ca_pb2.RotateCAResponse
    )
    assert (
        constraints.of_certificate(
            x509.load_der_x509_certificate(cleared.intermediate_certificate_der)
        )
        is None
    )
    await ca_env.call("IssueCertificate", request("nas.home.arpa"), ca_pb2.IssueCertificateResponse)
