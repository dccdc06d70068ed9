"""Accounts over their life, with the test client: ES256, ES384 and RS256 keys, key
rollover (the old key stops working, the new one is the account), deactivation (the
account refuses everything after), revocation by the certificate's own key, and external
account binding when the CA's config requires it."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import json
import secrets

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bench.acmeclient import AccountKey, AcmeClient, alg_of, b64, jwk, sign
from ca_service.acme.state import EAB, EabKey
from ca_service.store import rfc3339
from edgekms.v1 import ca_pb2
from mgmt.natsserver import free_port
from tests.acme.conftest import AcmeEnv, acme_config, start_acme

ACME = "urn:ietf:params:acme:error:"


def keys() -> dict[str, AccountKey]:
    return {
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "ES384": ec.generate_private_key(ec.SECP384R1()),
        "RS256": rsa.generate_private_key(65537, 2048),
    }


@pytest.mark.parametrize("alg", ["ES256", "ES384", "RS256"])
async def test_every_account_key_type_gets_a_certificate(acme_env: AcmeEnv, alg: str) -> None:
    client = acme_env.client(key=keys()[alg])
    assert alg_of(client.key) == alg
    created = await asyncio.to_thread(client.register, contact=["mailto:admin@nas.home.arpa"])
    assert created.status == 201 and created.json()["status"] == "valid"
    # The same key again: the same account (200), not a second one.
    again = await asyncio.to_thread(client.register)
    assert again.status == 200 and again.headers["location"] == created.headers["location"]
    _, pem, _ = await asyncio.to_thread(client.obtain, ["media.lan"], acme_env.webroot.answer)
    leaf = x509.load_pem_x509_certificates(pem)[0]
    record, _ = await acme_env.ca.store.get_record(f"{leaf.serial_number:X}")
    assert record.requester == "acme:" + client.kid.rsplit("/", 1)[1]


def key_change_payload(client: AcmeClient, new: AccountKey) -> dict[str, str]:
    url = client.directory["keyChange"]
    header = {"alg": alg_of(new), "jwk": jwk(new), "url": url}
    body = {"account": client.kid, "oldKey": jwk(client.key)}
    p64, b64body = b64(json.dumps(header).encode()), b64(json.dumps(body).encode())
    return {
        "protected": p64,
        "payload": b64body,
        "signature": b64(sign(new, f"{p64}.{b64body}".encode())),
    }


async def test_key_rollover_moves_the_account_to_the_new_key(acme_env: AcmeEnv) -> None:
    client = acme_env.client()
    await asyncio.to_thread(client.register)
    new = ec.generate_private_key(ec.SECP256R1())
    changed = await asyncio.to_thread(
        client.post, client.directory["keyChange"], key_change_payload(client, new)
    )
    assert changed.json()["key"] == jwk(new)
    old_key = client.key
    client.key = new
    await asyncio.to_thread(client.new_order, ["nas.home.arpa"])  # the new key works
    client.key = old_key
    refused = await asyncio.to_thread(
        client.post_raw,
        client.directory["newOrder"],
        {"identifiers": [{"type": "dns", "value": "nas.home.arpa"}]},
    )
    assert refused.status == 401 and refused.problem_type == ACME + "unauthorized"
    # And the old key names no account any more.
    lookup = acme_env.client(key=old_key)
    await asyncio.to_thread(lookup.load_directory)
    gone = await asyncio.to_thread(
        lookup.post_raw, lookup.directory["newAccount"], {"onlyReturnExisting": True}, use_jwk=True
    )
    assert gone.problem_type == ACME + "accountDoesNotExist"


async def test_a_deactivated_account_can_do_nothing_more(acme_env: AcmeEnv) -> None:
    client = acme_env.client()
    await asyncio.to_thread(client.register)
    done = await asyncio.to_thread(client.post, client.kid, {"status": "deactivated"})
    assert done.json()["status"] == "deactivated"
    refused = await asyncio.to_thread(
        client.post_raw,
        client.directory["newOrder"],
        {"identifiers": [{"type": "dns", "value": "nas.home.arpa"}]},
    )
    assert refused.status == 403 and refused.problem_type == ACME + "unauthorized"


async def test_revocation_by_the_certificate_key_and_by_another_account(acme_env: AcmeEnv) -> None:
    owner = acme_env.client()
    await asyncio.to_thread(owner.register)
    _, pem, cert_key = await asyncio.to_thread(
        owner.obtain, ["nas.home.arpa"], acme_env.webroot.answer
    )
    leaf = x509.load_pem_x509_certificates(pem)[0]
    der = leaf.public_bytes(
        __import__(
            "cryptography.hazmat.primitives.serialization", fromlist=["Encoding"]
        ).Encoding.DER
    )
    # Another account may not revoke it.
    stranger = acme_env.client()
    await asyncio.to_thread(stranger.register)
    refused = await asyncio.to_thread(
        stranger.post_raw, stranger.directory["revokeCert"], {"certificate": b64(der)}
    )
    assert refused.status == 403 and refused.problem_type == ACME + "unauthorized"
    record, _ = await acme_env.ca.store.get_record(f"{leaf.serial_number:X}")
    assert record.status == ca_pb2.CERTIFICATE_STATUS_VALID
    # The certificate's own key may (a JWS with its jwk, no account at all).
    holder = acme_env.client(key=cert_key)
    await asyncio.to_thread(holder.load_directory)
    revoked = await asyncio.to_thread(
        holder.post,
        holder.directory["revokeCert"],
        {"certificate": b64(der), "reason": 1},
        use_jwk=True,
    )
    assert revoked.status == 200
    record, _ = await acme_env.ca.store.get_record(f"{leaf.serial_number:X}")
    assert record.status == ca_pb2.CERTIFICATE_STATUS_REVOKED
    again = await asyncio.to_thread(
        holder.post_raw, holder.directory["revokeCert"], {"certificate": b64(der)}, use_jwk=True
    )
    assert again.problem_type == ACME + "alreadyRevoked"


def eab_binding(client: AcmeClient, kid: str, hmac_key: bytes) -> dict[str, str]:
    header = {"alg": "HS256", "kid": kid, "url": client.directory["newAccount"]}
    p64, body = b64(json.dumps(header).encode()), b64(json.dumps(jwk(client.key)).encode())
    mac = hmac.new(hmac_key, f"{p64}.{body}".encode(), hashlib.sha256).digest()
    return {"protected": p64, "payload": body, "signature": b64(mac)}


async def test_external_account_binding_when_required(acme_env: AcmeEnv) -> None:
    config = acme_config(free_port(), acme_env.webroot.port, eab_required=True)
    server = await start_acme(acme_env.ca, config, acme_env.audit)
    try:
        root = str(acme_env.root_pem)
        client = AcmeClient(config.directory_url, root)
        directory = await asyncio.to_thread(client.load_directory)
        assert directory["meta"]["externalAccountRequired"] is True
        without = await asyncio.to_thread(
            client.post_raw, directory["newAccount"], {"termsOfServiceAgreed": True}, use_jwk=True
        )
        assert without.problem_type == ACME + "externalAccountRequired"
        kid, hmac_key = secrets.token_urlsafe(12), secrets.token_bytes(32)
        await server.store.create(
            EAB,
            kid,
            EabKey(
                kid,
                b64(hmac_key),
                rfc3339(datetime.datetime.now(datetime.UTC)),
            ),
        )
        wrong = await asyncio.to_thread(
            client.post_raw,
            directory["newAccount"],
            {"externalAccountBinding": eab_binding(client, kid, b"x" * 32)},
            use_jwk=True,
        )
        assert wrong.problem_type == ACME + "unauthorized"
        ok = await asyncio.to_thread(
            client.register, externalAccountBinding=eab_binding(client, kid, hmac_key)
        )
        assert ok.status == 201
        # Single use: a second account cannot take the same binding.
        other = AcmeClient(config.directory_url, root)
        await asyncio.to_thread(other.load_directory)
        reused = await asyncio.to_thread(
            other.post_raw,
            directory["newAccount"],
            {"externalAccountBinding": eab_binding(other, kid, hmac_key)},
            use_jwk=True,
        )
        assert reused.problem_type == ACME + "unauthorized"
    finally:
        await server.stop()


async def test_accounts_and_binding_keys_list_a_page_at_a_time(acme_env: AcmeEnv) -> None:
    """The admin listing pages by id from an index kept up to date with the bucket: an
    account made between pages shows on a later listing, none is listed twice."""
    from ca_service.acme.admin import AcmeAdmin
    from edgekms.errors import InvalidArgument

    admin = AcmeAdmin(acme_env.server.store, acme_env.server)
    made = []
    for _ in range(5):
        client = acme_env.client()
        await asyncio.to_thread(client.register)
        made.append(client.kid.rsplit("/", 1)[1])
    seen: list[str] = []
    token = ""
    while True:
        page = await admin.list_accounts(
            ca_pb2.ListAcmeAccountsRequest(page_size=2, page_token=token)
        )
        assert len(page.accounts) <= 2
        seen += [a.id for a in page.accounts]
        if not page.next_page_token:
            break
        token = page.next_page_token
    assert sorted(seen) == sorted(made) and len(seen) == len(set(seen))
    late = acme_env.client()
    await asyncio.to_thread(late.register, contact=["mailto:late@nas.home.arpa"])
    again = await admin.list_accounts(ca_pb2.ListAcmeAccountsRequest(page_size=1000))
    by_id = {a.id: a for a in again.accounts}
    assert len(by_id) == 6 and by_id[late.kid.rsplit("/", 1)[1]].contact == [
        "mailto:late@nas.home.arpa"
    ]
    created = [await admin.create_eab(ca_pb2.CreateAcmeEabRequest(note=f"k{i}")) for i in range(3)]
    revoked = await admin.revoke_eab(ca_pb2.RevokeAcmeEabRequest(kid=created[0].eab.kid))
    assert revoked.eab.status == "revoked"
    keys = await admin.list_eab(ca_pb2.ListAcmeEabRequest(page_size=1000))
    states = {k.kid: k.status for k in keys.keys}
    assert states == {
        created[0].eab.kid: "revoked",
        created[1].eab.kid: "valid",
        created[2].eab.kid: "valid",
    }
    with pytest.raises(InvalidArgument) as caught:
        await admin.list_accounts(ca_pb2.ListAcmeAccountsRequest(page_size=1001))
    assert caught.value.reason == "list.page_size_invalid"
