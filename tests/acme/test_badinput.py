"""Every ACME refusal the issue names, against the real server: each answered with the
RFC 8555 problem type (and a stable reason in the CA's log), each leaving nothing
behind: no account, order, authorization or certificate record it would have made."""

from __future__ import annotations

import asyncio
import json

from bench.acmeclient import AcmeClient, b64, csr_for, jws
from ca_service.acme.state import ACCOUNT, ORDER, Account, Order
from tests.acme.conftest import AcmeEnv

ACME = "urn:ietf:params:acme:error:"


async def count(env: AcmeEnv, kind: str) -> int:
    cls = {ACCOUNT: Account, ORDER: Order}[kind]
    return len([r async for r in env.server.store.scan(kind, cls)])


async def registered(env: AcmeEnv) -> AcmeClient:
    client = env.client()
    await asyncio.to_thread(client.register)
    return client


async def test_bad_nonce_is_refused_and_makes_no_account(acme_env: AcmeEnv) -> None:
    client = acme_env.client()
    await asyncio.to_thread(client.load_directory)
    answer = await asyncio.to_thread(
        client.post_raw,
        client.directory["newAccount"],
        {"termsOfServiceAgreed": True},
        protected={"nonce": "not-a-nonce-of-this-server"},
    )
    assert answer.status == 400 and answer.problem_type == ACME + "badNonce"
    assert answer.headers["replay-nonce"]  # a fresh one to retry with
    assert await count(acme_env, ACCOUNT) == 0


async def test_reused_nonce_is_refused_and_makes_no_order(acme_env: AcmeEnv) -> None:
    client = await registered(acme_env)
    nonce = await asyncio.to_thread(client.new_nonce)
    ident = {"identifiers": [{"type": "dns", "value": "nas.home.arpa"}]}
    first = await asyncio.to_thread(
        client.post_raw, client.directory["newOrder"], ident, protected={"nonce": nonce}
    )
    assert first.status == 201
    before = await count(acme_env, ORDER)
    again = await asyncio.to_thread(
        client.post_raw, client.directory["newOrder"], ident, protected={"nonce": nonce}
    )
    assert again.status == 400 and again.problem_type == ACME + "badNonce"
    assert await count(acme_env, ORDER) == before == 1


async def test_jws_for_another_url_is_refused(acme_env: AcmeEnv) -> None:
    client = await registered(acme_env)
    ident = {"identifiers": [{"type": "dns", "value": "nas.home.arpa"}]}
    answer = await asyncio.to_thread(
        client.post_raw,
        client.directory["newOrder"],
        ident,
        protected={"url": client.directory["revokeCert"]},
    )
    assert answer.status == 403 and answer.problem_type == ACME + "unauthorized"
    assert await count(acme_env, ORDER) == 0


async def test_unknown_account_is_refused(acme_env: AcmeEnv) -> None:
    client = await registered(acme_env)
    client.kid = client.kid.rsplit("/", 1)[0] + "/nosuchaccount"
    answer = await asyncio.to_thread(
        client.post_raw,
        client.directory["newOrder"],
        {"identifiers": [{"type": "dns", "value": "nas.home.arpa"}]},
    )
    assert answer.status == 400 and answer.problem_type == ACME + "accountDoesNotExist"
    assert await count(acme_env, ORDER) == 0
    # The same for a key nobody registered, asking only for an existing account.
    stranger = acme_env.client()
    await asyncio.to_thread(stranger.load_directory)
    lookup = await asyncio.to_thread(
        stranger.post_raw,
        stranger.directory["newAccount"],
        {"onlyReturnExisting": True},
        use_jwk=True,
    )
    assert lookup.status == 400 and lookup.problem_type == ACME + "accountDoesNotExist"
    assert await count(acme_env, ACCOUNT) == 1


async def failed_order(env: AcmeEnv, name: str, key_authorization: str | None) -> dict:  # type: ignore[type-arg]
    """An order for `name` whose http-01 is answered with `key_authorization` (None:
    not at all); its state once validation has ended."""
    client = await registered(env)
    order_url, order = await asyncio.to_thread(client.new_order, [name])
    for chall in await asyncio.to_thread(client.challenges, order):
        if key_authorization is not None:
            env.webroot.answer(chall["token"], key_authorization)
        await asyncio.to_thread(client.post, chall["url"], {})
    final = await asyncio.to_thread(client.poll, order_url, ("ready", "invalid", "valid"))
    authz = (await asyncio.to_thread(client.get, order["authorizations"][0])).json()
    return {"order": final, "authz": authz}


async def test_wrong_key_authorization_invalidates_and_issues_nothing(acme_env: AcmeEnv) -> None:
    records = await acme_env.ca.record_count()
    seen = await failed_order(acme_env, "nas.home.arpa", "token.not-this-accounts-thumbprint")
    assert seen["order"]["status"] == "invalid"
    assert seen["authz"]["status"] == "invalid"
    http01 = next(c for c in seen["authz"]["challenges"] if c["type"] == "http-01")
    assert http01["status"] == "invalid"
    assert http01["error"]["type"] == ACME + "incorrectResponse"
    assert await acme_env.ca.record_count() == records


async def test_challenge_on_an_unreachable_host_fails_as_connection(acme_env: AcmeEnv) -> None:
    records = await acme_env.ca.record_count()
    seen = await failed_order(acme_env, "down.home.arpa", None)
    assert seen["order"]["status"] == "invalid"
    http01 = next(c for c in seen["authz"]["challenges"] if c["type"] == "http-01")
    assert http01["error"]["type"] == ACME + "connection"
    assert await acme_env.ca.record_count() == records


async def test_finalize_before_valid_is_refused_and_leaves_the_order_pending(
    acme_env: AcmeEnv,
) -> None:
    client = await registered(acme_env)
    order_url, order = await asyncio.to_thread(client.new_order, ["nas.home.arpa"])
    csr, _ = csr_for(["nas.home.arpa"])
    answer = await asyncio.to_thread(client.post_raw, order["finalize"], {"csr": b64(csr)})
    assert answer.status == 403 and answer.problem_type == ACME + "orderNotReady"
    pending = await asyncio.to_thread(client.get, order_url)
    assert pending.json()["status"] == "pending"
    assert pending.headers["retry-after"] == "1"  # when to look again (RFC 8555 8.2)
    assert await acme_env.ca.record_count() == 1  # the ACME server's own certificate


async def test_csr_names_not_in_the_order_are_refused_and_the_order_stays_ready(
    acme_env: AcmeEnv,
) -> None:
    client = await registered(acme_env)
    order_url, order = await asyncio.to_thread(client.new_order, ["nas.home.arpa"])
    for chall in await asyncio.to_thread(client.challenges, order):
        acme_env.webroot.answer(chall["token"], client.key_authorization(chall["token"]))
        await asyncio.to_thread(client.post, chall["url"], {})
    assert (await asyncio.to_thread(client.poll, order_url, ("ready", "invalid")))[
        "status"
    ] == "ready"
    records = await acme_env.ca.record_count()
    for names in (["media.lan"], ["nas.home.arpa", "media.lan"]):
        csr, _ = csr_for(names)
        answer = await asyncio.to_thread(client.post_raw, order["finalize"], {"csr": b64(csr)})
        assert answer.status == 400 and answer.problem_type == ACME + "badCSR", answer.body
    assert await acme_env.ca.record_count() == records
    assert (await asyncio.to_thread(client.get, order_url)).json()["status"] == "ready"
    # Nothing was consumed: the right CSR still gets the certificate.
    csr, _ = csr_for(["nas.home.arpa"])
    await asyncio.to_thread(client.post, order["finalize"], {"csr": b64(csr)})
    assert (await asyncio.to_thread(client.get, order_url)).json()["status"] == "valid"
    assert await acme_env.ca.record_count() == records + 1


async def test_oversized_body_is_refused_before_it_is_read(acme_env: AcmeEnv) -> None:
    client = await registered(acme_env)
    await asyncio.to_thread(client.new_nonce)
    protected = {"alg": "ES256", "nonce": client.nonce, "url": client.directory["newOrder"]}
    protected["kid"] = client.kid
    big = jws(client.key, protected, {"identifiers": [], "pad": "x" * 100_000})
    answer = await asyncio.to_thread(
        client.request,
        "POST",
        client.directory["newOrder"],
        json.dumps(big).encode(),
        "application/jose+json",
    )
    assert answer.status == 413 and answer.problem_type == ACME + "malformed"
    assert await count(acme_env, ORDER) == 0


async def test_names_outside_the_policy_are_rejected_before_any_authorization(
    acme_env: AcmeEnv,
) -> None:
    client = await registered(acme_env)
    for ident in (
        {"type": "dns", "value": "www.example.com"},
        {"type": "ip", "value": "8.8.8.8"},
        {"type": "dns", "value": "*.nas.home.arpa"},
    ):
        answer = await asyncio.to_thread(
            client.post_raw,
            client.directory["newOrder"],
            {"identifiers": [{"type": "dns", "value": "nas.home.arpa"}, ident]},
        )
        assert answer.status == 400, answer.body
        assert answer.problem_type == ACME + "rejectedIdentifier", answer.body
    assert await count(acme_env, ORDER) == 0
