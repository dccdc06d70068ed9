"""`kmsctl spiffe rotate` against the real stack: a refused rotation (root key disabled)
changes nothing; a rotation makes a new signing CA and JWT key in the token, the old JWT
key stays in the JWKS for the overlap and is then dropped, and the agent pushes both
changes on open FetchJWTBundles and FetchX509SVID streams, renewing at once the SVIDs the
old CA signed. An SVID from before still chains to the bundle's root; a JWT-SVID from
before validates until its key is dropped, and not after."""

from __future__ import annotations

import base64
import datetime
import functools
import json
import subprocess
from typing import Any

from cryptography import x509

from tests.logevents import entries
from tests.spiffe.conftest import (
    TRUST_DOMAIN,
    Agent,
    SpiffeStack,
    read_json_line,
    wait_for,
    workload,
    workload_process,
)

TD = f"spiffe://{TRUST_DOMAIN}"
UID = 1081


def _chain(svid: dict[str, Any]) -> list[x509.Certificate]:
    return [x509.load_der_x509_certificate(bytes.fromhex(h)) for h in svid["chain_der"]]


def _chains_to(svid: dict[str, Any], roots: list[x509.Certificate]) -> bool:
    """Leaf <- its intermediate <- one of `roots`, each signature checked, all in date."""
    leaf, intermediate = _chain(svid)
    now = datetime.datetime.now(datetime.UTC)
    try:
        leaf.verify_directly_issued_by(intermediate)
    except Exception:
        return False
    for cert in (leaf, intermediate):
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return False
    for root in roots:
        try:
            intermediate.verify_directly_issued_by(root)
            return True
        except Exception:  # noqa: S112 - InvalidSignature or a name mismatch: next root
            continue
    return False


def _kid(token: str) -> str:
    head = token.split(".")[0]
    return str(json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))["kid"])


def _bundle(stack: SpiffeStack) -> dict[str, Any]:
    return dict(json.loads(stack.kmsctl("spiffe", "bundle", "-o", "json").stdout))


def test_rotation_keeps_the_old_key_for_the_overlap_then_drops_it(
    spiffe_stack: SpiffeStack, agent: Agent
) -> None:
    spiffe_stack.entry(f"{TD}/rotated", f"unix:uid:{UID}")
    first = wait_for(
        lambda: (a := workload(agent.socket, UID, UID, "x509")).get("svids") and a, 60, "an SVID"
    )["svids"][0]
    old_jwt = workload(agent.socket, UID, UID, "jwt", "svc")["svids"][0]["token"]
    before = _bundle(spiffe_stack)
    old_kid = _kid(old_jwt)
    assert [k["kid"] for k in before["jwks"]["keys"]] == [old_kid]

    # Refused half-way (the root key that certifies a new CA is disabled): nothing moves.
    spiffe_stack.kmsctl("key", "disable", "ca/root")
    try:
        refused = spiffe_stack.kmsctl("spiffe", "rotate", check=False)
        assert refused.returncode == 6, refused.stdout + refused.stderr
        assert "ca.key_disabled" in refused.stderr, refused.stderr
    finally:
        spiffe_stack.kmsctl("key", "enable", "ca/root")
    assert _bundle(spiffe_stack) == before
    bad = spiffe_stack.kmsctl("spiffe", "rotate", "--overlap", "soon", check=False)
    assert bad.returncode == 3 and "spiffe.ttl_invalid" in bad.stderr, bad.stderr

    streams: list[subprocess.Popen[str]] = []
    try:
        svid_stream = workload_process(agent.socket, UID, UID, "stream", "20")
        jwks_stream = workload_process(agent.socket, UID, UID, "jwtbundles", "20")
        streams += [svid_stream, jwks_stream]
        assert read_json_line(svid_stream)["svids"][0]["serial"] == first["serial"]
        assert read_json_line(jwks_stream)["kids"][TD] == [old_kid]

        # Generous for a loaded machine, short enough to see the drop in this test.
        rotated = json.loads(
            spiffe_stack.kmsctl("spiffe", "rotate", "--overlap", "45s", "-o", "json").stdout
        )
        new_kid = rotated["jwt_kid"]
        assert new_kid != old_kid
        assert {r["kind"] for r in rotated["retired"]} == {"x509", "jwt"}
        # Generation 2 and its registry names were free: the refused attempt left no key.
        assert rotated["generation"] == 2
        # In the key registry (the broker's view of it follows a watch: polled).
        wait_for(
            lambda: (
                spiffe_stack.kmsctl("key", "show", "ca/spiffe-jwt-2", check=False).returncode == 0
            ),
            30,
            "ca/spiffe-jwt-2 in the registry",
        )

        # Pushed on the open JWT bundle stream: old and new side by side.
        while (kids := read_json_line(jwks_stream, timeout=60)["kids"][TD]) == [old_kid]:
            pass
        assert sorted(kids) == sorted([old_kid, new_kid])
        # Pushed on the open SVID stream: a new SVID from the new CA, not at half-life.
        old_ca = _chain(first)[1]
        while _chain(now := read_json_line(svid_stream, timeout=60)["svids"][0])[1] == old_ca:
            pass
        assert now["spiffe_id"] == f"{TD}/rotated"
        assert agent.events("spiffe_signing_ca_changed")
        roots = [
            x509.load_pem_x509_certificate(p.encode())
            for p in _bundle(spiffe_stack)["x509_authorities_pem"]
        ]
        # Both the SVID from before and the new one chain to the bundle's authorities.
        assert _chains_to(first, roots) and _chains_to(now, roots)
        assert _chain(now)[1].subject != _chain(first)[1].subject

        # The JWT-SVID from before validates during the overlap; new ones use the new key.
        valid = workload(agent.socket, UID, UID, "validate", "svc", old_jwt)
        assert valid.get("spiffe_id") == f"{TD}/rotated", valid
        new_jwt = workload(agent.socket, UID, UID, "jwt", "svc")["svids"][0]["token"]
        assert _kid(new_jwt) == new_kid

        # Past the overlap the old key leaves the bundle, the stream, and validation.
        while (kids := read_json_line(jwks_stream, timeout=120)["kids"][TD]) != [new_kid]:
            pass
        gone = workload(agent.socket, UID, UID, "validate", "svc", old_jwt)
        assert gone.get("error") == "INVALID_ARGUMENT", gone
        assert workload(agent.socket, UID, UID, "validate", "svc", new_jwt)["spiffe_id"]
        assert [k["kid"] for k in _bundle(spiffe_stack)["jwks"]["keys"]] == [new_kid]

        # Past the overlap the retired keys are destroyed in the token (the CA sweeps
        # them at its next SPIFFE request: the agent's sync), and the registry says so.
        def state_of(name: str) -> str:
            shown = spiffe_stack.kmsctl("key", "show", name, "-o", "json")
            return str(json.loads(shown.stdout)["state"])

        def destroyed(name: str) -> bool:
            return state_of(name) == "destroyed"

        for old_name in ("ca/spiffe", "ca/spiffe-jwt"):
            wait_for(functools.partial(destroyed, old_name), 60, f"{old_name} destroyed")
        assert state_of("ca/spiffe-2") == "active" and state_of("ca/spiffe-jwt-2") == "active"
        ca_log = (spiffe_stack.stack.data_dir / "logs" / "ca.log").read_text(errors="replace")
        swept = [e for e in entries(ca_log) if e.get("msg") == "spiffe_retired_key_destroyed"]
        assert {(e["kind"], e["key"]) for e in swept} == {
            ("x509", "ca/spiffe"),
            ("jwt", "ca/spiffe-jwt"),
        }
        # The new keys still sign: an SVID and a JWT-SVID after the sweep.
        fresh = workload(agent.socket, UID, UID, "jwt", "svc-after-sweep")["svids"][0]["token"]
        assert _kid(fresh) == new_kid
    finally:
        for proc in streams:
            proc.kill()
            proc.wait()
