"""Pure logic of the SPIFFE side, without a stack: SPIFFE IDs and selectors exactly as
the SPIFFE-ID specification and the agent's attestors allow them, the kmsctl refusals
made before anything is sent, systemd units read from a cgroup file, entry matching,
and JWT-SVID validation (alg, kid, audience, expiry, signature)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from edgekms import spiffe as sp
from edgekms.errors import InvalidArgument
from spiffe_agent import jwtsvid
from spiffe_agent.__main__ import parse_args, socket_path
from spiffe_agent.attest import Caller, selectors_of, unit_of_cgroup
from tests.e2e.conftest import BIN

GOOD_IDS = [
    "spiffe://home.arpa/backup",
    "spiffe://example.org/ns/prod/sa/web-1_x.y",
    "spiffe://a-b_c.d/x",
]
BAD_IDS = {
    "https://home.arpa/backup": "scheme",
    "SPIFFE://home.arpa/backup": "scheme",
    "spiffe://Home.arpa/backup": "trust domain characters",
    "spiffe:///backup": "trust domain is missing",
    "spiffe://home.arpa:8443/backup": "port",
    "spiffe://user@home.arpa/backup": "user info",
    "spiffe://home.arpa/backup?x=1": "query",
    "spiffe://home.arpa/backup#frag": "fragment",
    "spiffe://home.arpa/back%20up": "percent",
    "spiffe://home.arpa/a//b": "empty path segments",
    "spiffe://home.arpa/a/./b": "'.' and '..'",
    "spiffe://home.arpa/a/../b": "'.' and '..'",
    "spiffe://home.arpa/backup/": "trailing",
    "spiffe://home.arpa/b@ckup": "path characters",
    "spiffe://home.arpa/" + "a" * 2100: "longer than 2048",
}
BAD_SELECTORS = {
    "unix:uid:abc": "decimal",
    "unix:uid:-1": "decimal",
    "unix:uid:99999999999": "decimal",
    "unix:path:usr/bin/restic": "absolute",
    "unix:path:/usr/../bin/sh": "absolute",
    "unix:sha256:XYZ": "64 lower-case hex",
    "systemd:unit:backup": "systemd unit",
    "docker:label:x": "known kinds",
    "unix:uid": "type:key:value",
    "unix:uid:": "type:key:value",
}


@pytest.mark.parametrize("text", GOOD_IDS)
def test_valid_spiffe_ids_parse(text: str) -> None:
    assert str(sp.parse_id(text, require_path=True)) == text


@pytest.mark.parametrize("text", sorted(BAD_IDS))
def test_malformed_spiffe_ids_are_refused_with_the_reason(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        sp.parse_id(text, require_path=True)
    assert caught.value.reason == "spiffe.id_invalid"
    assert BAD_IDS[text] in caught.value.message


def test_a_workload_id_needs_a_path_and_a_trust_domain_is_checked_alone() -> None:
    with pytest.raises(InvalidArgument, match="needs a path"):
        sp.parse_id("spiffe://home.arpa", require_path=True)
    assert str(sp.parse_id("spiffe://home.arpa")) == "spiffe://home.arpa"
    for bad in ("", "Home.arpa", "home.arpa:443", "x" * 256):
        with pytest.raises(InvalidArgument) as caught:
            sp.check_trust_domain(bad)
        assert caught.value.reason == "spiffe.trust_domain_invalid"


@pytest.mark.parametrize("text", sorted(BAD_SELECTORS))
def test_malformed_selectors_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        sp.check_selector(text)
    assert caught.value.reason == "spiffe.selector_invalid"
    assert BAD_SELECTORS[text] in caught.value.message


def test_selector_lists_are_bounded_and_deduplicated() -> None:
    with pytest.raises(InvalidArgument) as caught:
        sp.check_selectors([])
    assert caught.value.reason == "spiffe.selector_missing"
    with pytest.raises(InvalidArgument):
        sp.check_selectors([f"unix:uid:{n}" for n in range(sp.MAX_SELECTORS + 1)])
    assert sp.check_selectors(["unix:uid:1", "unix:gid:2", "unix:uid:1"]) == [
        "unix:gid:2",
        "unix:uid:1",
    ]
    for bad_ttl in (5, 8 * 86400):
        with pytest.raises(InvalidArgument):
            sp.check_ttl(bad_ttl)
    assert sp.parse_seconds("90s") == 90 and sp.parse_seconds("1h") == 3600
    with pytest.raises(InvalidArgument):
        sp.parse_seconds("1 hour")


def test_an_entry_matches_only_when_every_selector_was_attested() -> None:
    caller = Caller(10, 1000, 1000, "/usr/bin/restic", "ab" * 32, "backup.service")
    attested = selectors_of(caller)
    assert attested == {
        "unix:uid:1000",
        "unix:gid:1000",
        "unix:path:/usr/bin/restic",
        f"unix:sha256:{'ab' * 32}",
        "systemd:unit:backup.service",
    }
    assert sp.matches(["unix:uid:1000", "systemd:unit:backup.service"], attested)
    assert not sp.matches(["unix:uid:1000", "unix:path:/usr/bin/rsync"], attested)
    assert not sp.matches([], attested)


def test_the_systemd_unit_comes_from_the_cgroup_file() -> None:
    assert unit_of_cgroup("0::/system.slice/backup.service\n") == "backup.service"
    # A sub-cgroup a service made of its own is still that service.
    assert unit_of_cgroup("0::/system.slice/backup.service/worker\n") == "backup.service"
    assert unit_of_cgroup("0::/system.slice/system-getty.slice/getty@tty1.service") == (
        "getty@tty1.service"
    )
    # A user's own manager names the cgroups under it as it likes: a "backup.service"
    # of uid 1000's making is in the system unit user@1000.service, not backup.service.
    assert (
        unit_of_cgroup("0::/user.slice/user-1000.slice/user@1000.service/app.slice/x.scope")
        == "user@1000.service"
    )
    spoof = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/backup.service\n"
    assert unit_of_cgroup(spoof) == "user@1000.service"
    # Legacy and hybrid hierarchies: systemd's named one counts, other controllers not.
    hybrid = "12:pids:/system.slice/nginx.service\n1:name=systemd:/system.slice/sshd.service\n0::/"
    assert unit_of_cgroup(hybrid) == "sshd.service"
    assert unit_of_cgroup("12:pids:/system.slice/nginx.service\n") == ""
    assert unit_of_cgroup("0::/\n") == ""
    assert unit_of_cgroup("0::/docker/abc\n") == ""  # not a unit: none


def test_the_agents_arguments_and_socket_forms() -> None:
    assert socket_path("unix:///run/edgekms/workload.sock").as_posix() == (
        "/run/edgekms/workload.sock"
    )
    assert socket_path("unix:/tmp/w.sock").as_posix() == "/tmp/w.sock"
    with pytest.raises(ValueError):
        socket_path("tcp://127.0.0.1:8081")
    with pytest.raises(ValueError):
        parse_args(["--socket", "unix:///x.sock"])  # no --client-config
    with pytest.raises(ValueError):
        parse_args(["--client-config", "c.toml", "--sync-interval", "0"])


def _token(
    key: ec.EllipticCurvePrivateKey, kid: str, claims: dict[str, object], alg: str = "ES256"
) -> str:
    signing_input = sp.jwt_signing_input({"alg": alg, "kid": kid, "typ": "JWT"}, claims)
    der = key.sign(signing_input, ec.ECDSA(hashes.SHA256()))
    return f"{signing_input.decode()}.{sp.b64url(sp.der_to_jose(der))}"


def test_jwt_svid_validation() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    kid = sp.jwt_kid(key.public_key())
    jwks = {
        "home.arpa": json.dumps({"keys": [sp.jwk_of(key.public_key(), kid, "jwt-svid")]}).encode()
    }
    now = int(time.time())
    claims = {"sub": "spiffe://home.arpa/web", "aud": ["nas-api"], "exp": now + 60, "iat": now}
    assert (
        jwtsvid.validate(_token(key, kid, claims), "nas-api", jwks)[0] == "spiffe://home.arpa/web"
    )

    def refused(token: str, audience: str = "nas-api") -> str:
        with pytest.raises(InvalidArgument) as caught:
            jwtsvid.validate(token, audience, jwks)
        return caught.value.reason

    assert refused(_token(key, kid, claims), "bank-api") == "jwt.audience_mismatch"
    assert refused(_token(key, kid, {**claims, "exp": now - 1})) == "jwt.expired"
    assert refused(_token(key, kid, claims, alg="none")) == "jwt.algorithm_unsupported"
    assert refused(_token(key, "other-kid", claims)) == "jwt.key_unknown"
    other = ec.generate_private_key(ec.SECP256R1())
    assert refused(_token(other, kid, claims)) == "jwt.signature_invalid"
    foreign = {**claims, "sub": "spiffe://other.example/x"}
    assert refused(_token(key, kid, foreign)) == "jwt.trust_domain_unknown"
    assert refused("a.b") == "jwt.malformed"
    assert refused(_token(key, kid, claims), "") == "jwt.audience_missing"


@pytest.mark.parametrize(
    "args",
    [
        ["--id", "spiffe://home.arpa/a?b", "--node", "nas", "--selector", "unix:uid:1"],
        ["--id", "spiffe://home.arpa/a", "--node", "nas", "--selector", "unix:uid:x"],
        ["--id", "spiffe://home.arpa/a", "--node", "NAS!", "--selector", "unix:uid:1"],
        ["--id", "spiffe://home.arpa/a", "--node", "nas", "--selector", "unix:uid:1",
         "--ttl", "2s"],
    ],
)  # fmt: skip
def test_kmsctl_refuses_a_malformed_entry_before_sending_it(
    args: list[str], tmp_path: object
) -> None:
    """Exit 3 (invalid argument) with a one-line reason, and no KMS needed to say so."""
    done = subprocess.run(
        [str(BIN / "kmsctl"), "spiffe", "entry", "create", *args, "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith("kmsctl: spiffe.")


def test_the_agent_refuses_a_missing_client_config_in_one_line(tmp_path: Path) -> None:
    """Exit 6 and `kmsctl: config.missing: ...`, not a traceback; no socket is left."""
    sock = tmp_path / "run" / "workload.sock"
    done = subprocess.run(
        [str(BIN / "kmsctl"), "spiffe", "agent", "--client-config", str(tmp_path / "none.toml"),
         "--socket", f"unix://{sock}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 6, done.stderr
    assert done.stderr.startswith("kmsctl: config.missing:") and "Traceback" not in done.stderr
    assert not sock.exists()


def _signed(alg: str, key: Any, kid: str, claims: dict[str, object], **header: object) -> str:
    """A JWT signed as the JWT-SVID specification's `alg` says (raw r||s for ES*)."""
    signing_input = sp.jwt_signing_input({"alg": alg, "kid": kid, **header}, claims)
    spec = jwtsvid.ALGORITHMS[alg]
    if isinstance(key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(spec.hash())))
        size = (key.curve.key_size + 7) // 8
        signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    elif spec.pss:
        pss = padding.PSS(mgf=padding.MGF1(spec.hash()), salt_length=spec.hash().digest_size)
        signature = key.sign(signing_input, pss, spec.hash())
    else:
        signature = key.sign(signing_input, padding.PKCS1v15(), spec.hash())
    return f"{signing_input.decode()}.{sp.b64url(signature)}"


def _rsa_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, str]:
    n = key.public_key().public_numbers()
    return {
        "kty": "RSA", "use": "jwt-svid", "kid": kid,
        "n": sp.b64url(n.n.to_bytes((n.n.bit_length() + 7) // 8, "big")),
        "e": sp.b64url(n.e.to_bytes(3, "big")),
    }  # fmt: skip


def _ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, str]:
    n = key.public_key().public_numbers()
    size = (key.curve.key_size + 7) // 8
    crv = {"secp384r1": "P-384", "secp521r1": "P-521"}[key.curve.name]
    return {
        "kty": "EC", "crv": crv, "use": "jwt-svid", "kid": kid,
        "x": sp.b64url(n.x.to_bytes(size, "big")), "y": sp.b64url(n.y.to_bytes(size, "big")),
    }  # fmt: skip


def test_jwt_svids_of_every_algorithm_the_specification_lists() -> None:
    """A federated trust domain may sign with RSA (RS*, PS*) or another curve (ES384,
    ES512): each validates with a key of its kind, and a key of the wrong kind, an alg
    outside the list, a bad typ, a crit header or an nbf in the future are refused."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    p384 = ec.generate_private_key(ec.SECP384R1())
    p521 = ec.generate_private_key(ec.SECP521R1())
    p256 = ec.generate_private_key(ec.SECP256R1())
    keys = [
        _rsa_jwk(rsa_key, "rsa"),
        _ec_jwk(p384, "p384"),
        _ec_jwk(p521, "p521"),
        sp.jwk_of(p256.public_key(), "p256", "jwt-svid"),
    ]
    jwks = {"spire.example": json.dumps({"keys": keys}).encode()}
    now = int(time.time())
    claims = {"sub": "spiffe://spire.example/db", "aud": "db-api", "exp": now + 60}
    signers: dict[str, tuple[Any, str]] = {
        "RS256": (rsa_key, "rsa"), "RS384": (rsa_key, "rsa"), "RS512": (rsa_key, "rsa"),
        "PS256": (rsa_key, "rsa"), "PS384": (rsa_key, "rsa"), "PS512": (rsa_key, "rsa"),
        "ES256": (p256, "p256"), "ES384": (p384, "p384"), "ES512": (p521, "p521"),
    }  # fmt: skip
    assert set(signers) == set(jwtsvid.ALGORITHMS)
    for alg, (key, kid) in signers.items():
        for typ in ({}, {"typ": "JWT"}, {"typ": "JOSE"}):
            token = _signed(alg, key, kid, claims, **typ)
            assert jwtsvid.validate(token, "db-api", jwks)[0] == "spiffe://spire.example/db"

    def refused(token: str) -> str:
        with pytest.raises(InvalidArgument) as caught:
            jwtsvid.validate(token, "db-api", jwks)
        return caught.value.reason

    # The RSA key named for an ES256 token, the P-384 key for ES256: not its kind.
    assert refused(_signed("ES256", p256, "rsa", claims)) == "jwt.key_unsupported"
    assert refused(_signed("ES256", p256, "p384", claims)) == "jwt.key_unsupported"
    assert refused(_signed("RS256", rsa_key, "p256", claims)) == "jwt.key_unsupported"
    # A PS256 signature is not an RS256 one, though the key is the same.
    ps = _signed("PS256", rsa_key, "rsa", claims).split(".")
    rs_head = _signed("RS256", rsa_key, "rsa", claims).split(".")[0]
    assert refused(f"{rs_head}.{ps[1]}.{ps[2]}") == "jwt.signature_invalid"
    hs = sp.jwt_signing_input({"alg": "HS256", "kid": "rsa"}, claims).decode()
    assert refused(f"{hs}.{sp.b64url(b'x' * 32)}") == "jwt.algorithm_unsupported"
    assert refused(_signed("ES384", p384, "p384", claims, typ="at+jwt")) == "jwt.type_invalid"
    assert refused(_signed("ES384", p384, "p384", claims, crit=["exp"])) == "jwt.header_unsupported"
    later = {**claims, "nbf": now + 600}
    assert refused(_signed("ES384", p384, "p384", later)) == "jwt.not_yet_valid"
    assert refused(_signed("ES384", p384, "p384", {**claims, "exp": True})) == "jwt.expired"
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - refused
    weak = {"spire.example": json.dumps({"keys": [_rsa_jwk(small, "small")]}).encode()}
    with pytest.raises(InvalidArgument) as caught:
        jwtsvid.validate(_signed("RS256", small, "small", claims), "db-api", weak)
    assert caught.value.reason == "jwt.key_unsupported"
