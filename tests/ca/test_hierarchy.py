"""The CA above the leaves, on real parts (nats-server, kms-crypto on SoftHSM, the CA's
HTTP side): the root's CRL and `openssl verify -crl_check_all`, revoking the
intermediate, OCSP about the intermediate, and rotation with the retired intermediate
still signing its CRL and OCSP. pkilint lints every certificate and both CRLs."""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca_service import hierarchy
from ca_service.builder import key_id_hex
from ca_service.store import rfc3339
from edgekms.errors import FailedPrecondition, InvalidArgument, KMSError, NotFound
from edgekms.v1 import ca_pb2
from edgekms.v1 import common_pb2 as pb
from tests.ca.conftest import PROVIDER, CAEnv, write
from tests.ca.helpers import make_csr, make_key
from tests.ca.lint import pkilint_findings
from tests.ca.test_service import http_get, run


def pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


async def init(env: CAEnv, disable_root: bool = False) -> ca_pb2.InitCAResponse:
    return await env.call(
        "Init",
        ca_pb2.InitCARequest(
            provider=PROVIDER,
            key_type=pb.KEY_TYPE_EC_P256,
            common_name="Home CA",
            organization="EdgeKMS Tests",
            disable_root=disable_root,
        ),
        ca_pb2.InitCAResponse,
    )


async def issue(env: CAEnv, name: str) -> ca_pb2.IssueCertificateResponse:
    csr = make_csr(make_key("ec-p256"), cn=name, sans=(f"dns:{name}",))
    return await env.call(
        "IssueCertificate",
        ca_pb2.IssueCertificateRequest(profile="https-server", csr=csr, requester="admin"),
        ca_pb2.IssueCertificateResponse,
    )


async def fetch_crl(env: CAEnv, path: str, tmp: Path) -> Path:
    """GET a CRL, lint it, and write it as PEM for openssl."""
    status, ctype, body = await http_get(f"{env.http_url}{path}")
    assert status == 200 and ctype == "application/pkix-crl", (status, body[:200])
    assert pkilint_findings("crl", body, tmp) == []
    if path == "/root.crl":  # it lists CAs only: an ARL in pkilint's terms, clean as either
        assert pkilint_findings("arl", body, tmp) == []
    crl = x509.load_der_x509_crl(body)
    return write(
        tmp / f"{path.strip('/').replace('/', '-')}.pem",
        crl.public_bytes(serialization.Encoding.PEM),
    )


def crl_dp(cert: x509.Certificate) -> str:
    points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    return str(points[0].full_name[0].value)  # type: ignore[index]


async def verify_all(
    tmp: Path, root: Path, chain: Path, crls: list[Path], leaf: Path
) -> tuple[int, str]:
    """openssl verify with revocation checked for every certificate in the chain."""
    bundle = write(tmp / "crls.pem", b"".join(p.read_bytes() for p in crls))
    done = await run(
        "openssl", "verify", "-crl_check_all", "-CAfile", str(root), "-untrusted", str(chain),
        "-CRLfile", str(bundle), str(leaf),
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


async def ocsp_status(env: CAEnv, issuer: Path, cert: Path, root: Path, chain: Path) -> str:
    done = await run(
        "openssl", "ocsp", "-issuer", str(issuer), "-cert", str(cert),
        "-url", f"{env.http_url}/ocsp", "-CAfile", str(root), "-verify_other", str(chain),
    )  # fmt: skip
    assert "Response verify OK" in done.stderr, done.stdout + done.stderr
    return done.stdout


async def test_root_crl_and_revoking_the_intermediate(ca_env: CAEnv, tmp_path: Path) -> None:
    made = await init(ca_env)
    root_cert = x509.load_der_x509_certificate(made.root_certificate_der)
    inter_cert = x509.load_der_x509_certificate(made.intermediate_certificate_der)
    assert crl_dp(inter_cert) == f"{ca_env.http_url}/root.crl"
    for der in (made.root_certificate_der, made.intermediate_certificate_der):
        assert pkilint_findings("cert", der, tmp_path) == []
    leaf = await issue(ca_env, "nas.example.com")
    assert pkilint_findings("cert", leaf.certificate_der, tmp_path) == []
    key_id = key_id_hex(inter_cert)
    assert leaf.record.issuer_key_id == key_id
    assert crl_dp(x509.load_der_x509_certificate(leaf.certificate_der)) == (
        f"{ca_env.http_url}/crl/{key_id}"
    )

    root = write(tmp_path / "root.pem", pem(made.root_certificate_der))
    inter = write(tmp_path / "inter.pem", pem(made.intermediate_certificate_der))
    leaf_pem = write(tmp_path / "leaf.pem", pem(leaf.certificate_der))
    root_crl = await fetch_crl(ca_env, "/root.crl", tmp_path)
    inter_crl = await fetch_crl(ca_env, f"/crl/{key_id}", tmp_path)
    assert x509.load_pem_x509_crl(root_crl.read_bytes()).issuer == root_cert.subject
    # Long-lived: the root key may sleep for months.
    lifetime = x509.load_pem_x509_crl(root_crl.read_bytes())
    assert lifetime.next_update_utc is not None
    assert lifetime.next_update_utc - lifetime.last_update_utc == hierarchy.ROOT_CRL_VALIDITY

    code, out = await verify_all(tmp_path, root, inter, [root_crl, inter_crl], leaf_pem)
    assert code == 0 and ": OK" in out, out
    # Without the root's CRL a strict verifier cannot check the intermediate.
    code, out = await verify_all(tmp_path, root, inter, [inter_crl], leaf_pem)
    assert code != 0 and "unable to get certificate CRL" in out, out
    assert f"{inter}: good" in await ocsp_status(ca_env, root, inter, root, inter)

    # Refusals first: nothing changes.
    for serial, error, reason in [
        ("ABCDEF", NotFound, "ca.intermediate_unknown"),
        ("not hex", NotFound, "ca.intermediate_unknown"),
        (leaf.record.serial, NotFound, "ca.intermediate_unknown"),
    ]:
        with pytest.raises(error) as exc:
            await ca_env.call(
                "RevokeIntermediate",
                ca_pb2.RevokeIntermediateRequest(serial=serial),
                ca_pb2.RevokeIntermediateResponse,
            )
        assert exc.value.reason == reason

    serial = f"{inter_cert.serial_number:X}"
    revoked = await ca_env.call(
        "RevokeIntermediate",
        ca_pb2.RevokeIntermediateRequest(
            serial=serial, reason=ca_pb2.REVOCATION_REASON_CA_COMPROMISE
        ),
        ca_pb2.RevokeIntermediateResponse,
    )
    assert revoked.serial == serial and revoked.root_crl_number > 0
    with pytest.raises(FailedPrecondition) as again:
        await ca_env.call(
            "RevokeIntermediate",
            ca_pb2.RevokeIntermediateRequest(serial=serial),
            ca_pb2.RevokeIntermediateResponse,
        )
    assert again.value.reason == "ca.intermediate_already_revoked"

    root_crl = await fetch_crl(ca_env, "/root.crl", tmp_path)
    listed = x509.load_pem_x509_crl(root_crl.read_bytes())
    entry = listed.get_revoked_certificate_by_serial_number(inter_cert.serial_number)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.ca_compromise
    )
    code, out = await verify_all(tmp_path, root, inter, [root_crl, inter_crl], leaf_pem)
    assert code != 0 and "certificate revoked" in out, out
    assert f"{inter}: revoked" in await ocsp_status(ca_env, root, inter, root, inter)


async def test_a_revoked_intermediate_issues_nothing_until_rotation(ca_env: CAEnv) -> None:
    made = await init(ca_env)
    serial = f"{x509.load_der_x509_certificate(made.intermediate_certificate_der).serial_number:X}"
    await ca_env.call(
        "RevokeIntermediate",
        ca_pb2.RevokeIntermediateRequest(
            serial=serial, reason=ca_pb2.REVOCATION_REASON_KEY_COMPROMISE
        ),
        ca_pb2.RevokeIntermediateResponse,
    )
    before = await ca_env.record_count()
    with pytest.raises(FailedPrecondition) as refused:
        await issue(ca_env, "after.example.com")
    assert refused.value.reason == "ca.intermediate_revoked"
    assert await ca_env.record_count() == before
    await ca_env.call("Rotate", ca_pb2.RotateCARequest(), ca_pb2.RotateCAResponse)
    issued = await issue(ca_env, "after.example.com")
    assert issued.record.status == ca_pb2.CERTIFICATE_STATUS_VALID


async def test_rotation_keeps_the_old_intermediate_signing(ca_env: CAEnv, tmp_path: Path) -> None:
    made = await init(ca_env)
    old_cert = x509.load_der_x509_certificate(made.intermediate_certificate_der)
    old_leaf = await issue(ca_env, "old.example.com")

    rotated = await ca_env.call(
        "Rotate", ca_pb2.RotateCARequest(intermediate_validity_days=365), ca_pb2.RotateCAResponse
    )
    new_cert = x509.load_der_x509_certificate(rotated.intermediate_certificate_der)
    new_cert.verify_directly_issued_by(x509.load_der_x509_certificate(made.root_certificate_der))
    assert new_cert.subject.rfc4514_string() == "CN=Home CA Issuing CA 2,O=EdgeKMS Tests"
    assert key_id_hex(new_cert) != key_id_hex(old_cert)
    assert list(rotated.retired_intermediates_der) == [made.intermediate_certificate_der]
    assert pkilint_findings("cert", rotated.intermediate_certificate_der, tmp_path) == []
    certs = await ca_env.call(
        "GetCACertificates", ca_pb2.GetCACertificatesRequest(), ca_pb2.GetCACertificatesResponse
    )
    assert certs.intermediate_certificate_der == rotated.intermediate_certificate_der
    assert list(certs.retired_intermediates_der) == [made.intermediate_certificate_der]

    new_leaf = await issue(ca_env, "new.example.com")
    assert new_leaf.record.issuer_key_id == key_id_hex(new_cert)
    assert list(new_leaf.chain_der) == [
        rotated.intermediate_certificate_der,
        made.root_certificate_der,
    ]
    x509.load_der_x509_certificate(new_leaf.certificate_der).verify_directly_issued_by(new_cert)

    # The old intermediate's leaf is revoked after the rotation: its CRL, signed by the
    # old key, says so; the new leaf is untouched.
    revoked = await ca_env.call(
        "RevokeCertificate",
        ca_pb2.RevokeCertificateRequest(serial=old_leaf.record.serial),
        ca_pb2.RevokeCertificateResponse,
    )
    assert revoked.record.status == ca_pb2.CERTIFICATE_STATUS_REVOKED

    status, _, chain_body = await http_get(f"{ca_env.http_url}/chain.pem")
    assert status == 200
    served = x509.load_pem_x509_certificates(chain_body)
    assert [c.subject for c in served] == [
        new_cert.subject,
        old_cert.subject,
        x509.load_der_x509_certificate(made.root_certificate_der).subject,
    ]
    root = write(tmp_path / "root.pem", pem(made.root_certificate_der))
    chain = write(tmp_path / "chain.pem", b"".join(pem(d) for d in (
        rotated.intermediate_certificate_der, made.intermediate_certificate_der)))  # fmt: skip
    old_pem = write(tmp_path / "old-leaf.pem", pem(old_leaf.certificate_der))
    new_pem = write(tmp_path / "new-leaf.pem", pem(new_leaf.certificate_der))
    old_inter = write(tmp_path / "old-inter.pem", pem(made.intermediate_certificate_der))
    new_inter = write(tmp_path / "new-inter.pem", pem(rotated.intermediate_certificate_der))
    crls = [
        await fetch_crl(ca_env, "/root.crl", tmp_path),
        await fetch_crl(ca_env, f"/crl/{key_id_hex(old_cert)}", tmp_path),
        await fetch_crl(ca_env, f"/crl/{key_id_hex(new_cert)}", tmp_path),
    ]
    old_crl = x509.load_pem_x509_crl(crls[1].read_bytes())
    old_key = old_cert.public_key()
    assert isinstance(old_key, ec.EllipticCurvePublicKey)
    assert old_crl.issuer == old_cert.subject and old_crl.is_signature_valid(old_key)
    assert old_crl.get_revoked_certificate_by_serial_number(int(old_leaf.record.serial, 16))
    code, out = await verify_all(tmp_path, root, chain, crls, old_pem)
    assert code != 0 and "certificate revoked" in out, out
    code, out = await verify_all(tmp_path, root, chain, crls, new_pem)
    assert code == 0 and ": OK" in out, out
    # OCSP: the old intermediate answers for its leaf, the new one for its own, and the
    # root for both intermediates.
    assert f"{old_pem}: revoked" in await ocsp_status(ca_env, old_inter, old_pem, root, chain)
    assert f"{new_pem}: good" in await ocsp_status(ca_env, new_inter, new_pem, root, chain)
    assert f"{old_inter}: good" in await ocsp_status(ca_env, root, old_inter, root, chain)
    status, _, body = await http_get(f"{ca_env.http_url}/ca/{key_id_hex(old_cert)}.crt")
    assert status == 200 and body == made.intermediate_certificate_der
    status, _, _ = await http_get(f"{ca_env.http_url}/crl/00FF")
    assert status == 404

    # Once every certificate of the old intermediate has expired it is dropped: it
    # leaves the chain and signs nothing more.
    records = await ca_env.store.list_records()
    assert await hierarchy.drop_spent_retired(ca_env.ca, records) == 0
    past = rfc3339(datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1))
    for record in records:
        if record.issuer_key_id == key_id_hex(old_cert):
            record.not_after = past
    assert await hierarchy.drop_spent_retired(ca_env.ca, records) == 1
    certs = await ca_env.call(
        "GetCACertificates", ca_pb2.GetCACertificatesRequest(), ca_pb2.GetCACertificatesResponse
    )
    assert list(certs.retired_intermediates_der) == []
    # Its certificates can no longer reach a CRL: revoking one is refused, not lost.
    before = await ca_env.store.get_record(old_leaf.record.serial)
    with pytest.raises(FailedPrecondition) as gone:
        await ca_env.call(
            "RevokeCertificate",
            ca_pb2.RevokeCertificateRequest(serial=old_leaf.record.serial),
            ca_pb2.RevokeCertificateResponse,
        )
    assert gone.value.reason == "cert.issuer_retired"
    assert await ca_env.store.get_record(old_leaf.record.serial) == before


async def test_rotation_needs_the_root(ca_env: CAEnv, tmp_path: Path) -> None:
    made = await init(ca_env, disable_root=True)
    with pytest.raises(FailedPrecondition) as exc:
        await ca_env.call("Rotate", ca_pb2.RotateCARequest(), ca_pb2.RotateCAResponse)
    assert exc.value.reason == "ca.key_disabled"
    with pytest.raises(FailedPrecondition) as revoke:
        await ca_env.call(
            "RevokeIntermediate",
            ca_pb2.RevokeIntermediateRequest(
                serial=f"{x509.load_der_x509_certificate(made.intermediate_certificate_der).serial_number:X}"
            ),
            ca_pb2.RevokeIntermediateResponse,
        )
    assert revoke.value.reason == "ca.key_disabled"
    state = await ca_env.store.require_state()
    assert state.intermediate_certificate_der == made.intermediate_certificate_der
    assert not state.retired and not state.revoked_intermediates
    # OCSP about the intermediate while the root sleeps: the answer the root signed at
    # init (good, without the nonce), which openssl accepts.
    root = write(tmp_path / "root.pem", pem(made.root_certificate_der))
    inter = write(tmp_path / "inter.pem", pem(made.intermediate_certificate_der))
    assert f"{inter}: good" in await ocsp_status(ca_env, root, inter, root, inter)
    # The root CRL signed at init is still served while the root sleeps.
    crl = await ca_env.call("GetRootCRL", ca_pb2.GetRootCRLRequest(), ca_pb2.GetCRLResponse)
    assert (
        x509.load_der_x509_crl(crl.crl_der).issuer
        == x509.load_der_x509_certificate(made.root_certificate_der).subject
    )


async def test_two_rotations_at_once_leave_one(ca_env: CAEnv) -> None:
    """Both build a new intermediate; the CA state takes one (revision check), the other
    is refused with its key destroyed, and bad constraints are refused before any key."""
    made = await init(ca_env)
    with pytest.raises(InvalidArgument) as bad:
        await ca_env.call(
            "Rotate",
            ca_pb2.RotateCARequest(
                clear_name_constraints=True,
                name_constraints=ca_pb2.NameConstraints(permitted_dns=["home.arpa"]),
            ),
            ca_pb2.RotateCAResponse,
        )
    assert bad.value.reason == "ca.name_constraint_invalid"
    # Both rotations read the CA state before either writes it: each waits in key
    # generation (the real token's) until the other has arrived there too.
    real = ca_env.ca.keys
    arrived = asyncio.Barrier(2)

    class Gated:
        async def generate(self, provider: str, label: str, key_type: Any) -> tuple[bytes, bytes]:
            await asyncio.wait_for(arrived.wait(), 60)
            return await real.generate(provider, label, key_type)

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    ca_env.ca.keys = Gated()  # type: ignore[assignment]
    try:
        results = await asyncio.gather(
            *(
                ca_env.call("Rotate", ca_pb2.RotateCARequest(), ca_pb2.RotateCAResponse)
                for _ in "ab"
            ),
            return_exceptions=True,
        )
    finally:
        ca_env.ca.keys = real
    won = [r for r in results if isinstance(r, ca_pb2.RotateCAResponse)]
    lost = [r for r in results if isinstance(r, KMSError)]
    assert len(won) == 1 and len(lost) == 1, results
    assert isinstance(lost[0], FailedPrecondition) and lost[0].reason == "ca.state_changed"
    state = await ca_env.store.require_state()
    assert [r.certificate_der for r in state.retired] == [made.intermediate_certificate_der]
    assert state.intermediate_certificate_der == won[0].intermediate_certificate_der


async def test_unknown_intermediate_crl_or_certificate_is_not_found(ca_env: CAEnv) -> None:
    made = await init(ca_env)
    key_id = key_id_hex(x509.load_der_x509_certificate(made.intermediate_certificate_der))
    crl = await ca_env.call(
        "GetIssuerCRL", ca_pb2.GetIssuerCRLRequest(key_id=key_id.lower()), ca_pb2.GetCRLResponse
    )
    assert crl.crl_der
    for bogus in ("00FF", "", "../config"):
        with pytest.raises(NotFound) as exc:
            await ca_env.call(
                "GetIssuerCRL", ca_pb2.GetIssuerCRLRequest(key_id=bogus), ca_pb2.GetCRLResponse
            )
        assert exc.value.reason == "ca.intermediate_unknown"
    for path in ("/crl/00FF", "/crl/..%2Fconfig", "/ca/00FF.crt", f"/ca/{key_id}.pem"):
        status, _, _ = await http_get(f"{ca_env.http_url}{path}")
        assert status == 404, path
