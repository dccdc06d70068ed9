"""An account's orders, against the real CA (nats-server with JetStream, SoftHSM, the CA
service) with the test ACME client. They do not pile up: an order (valid, pending or
invalid) and its authorizations are deleted `order_retention_days` after the order
expired; a pass is judged by its clock (`prune_orders(now=...)`), so a 7-day expiry needs
no waiting; an order being finalized is never deleted, and the pass is audited. And the
account lists them (RFC 8555 7.1.2.1), a page at a time, its own only."""

from __future__ import annotations

import asyncio
import datetime

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from bench.acmeclient import AcmeError
from ca_service.acme import server as acme_server
from ca_service.acme.server import ORDER_LIFETIME
from ca_service.acme.settings import parse_acme
from ca_service.acme.state import AUTHZ, ORDER, Authz, Order
from tests.acme.conftest import AcmeEnv
from tests.acme.test_certbot import audit_actions


async def test_orders_are_deleted_a_retention_window_after_they_expired(
    acme_env: AcmeEnv,
) -> None:
    client = acme_env.client(key=ec.generate_private_key(ec.SECP256R1()))
    await asyncio.to_thread(client.register)
    done_url, _, _ = await asyncio.to_thread(client.obtain, ["media.lan"], acme_env.webroot.answer)
    pending_url, pending = await asyncio.to_thread(client.new_order, ["nas.home.arpa"])
    store, server = acme_env.server.store, acme_env.server
    ids = [done_url.rsplit("/", 1)[1], pending_url.rsplit("/", 1)[1]]
    orders = [(await store.get(ORDER, i, Order)) for i in ids]
    assert all(o is not None for o in orders)
    authz_ids = [a for o in orders if o is not None for a in o[0].authzs]
    # One more order, caught mid-finalize: processing is never pruned.
    busy_url, _ = await asyncio.to_thread(client.new_order, ["www.nas.home.arpa"])
    busy_id = busy_url.rsplit("/", 1)[1]
    found = await store.get(ORDER, busy_id, Order)
    assert found is not None
    busy, revision = found
    busy.status = "processing"
    await store.update(ORDER, busy_id, busy, revision)

    now = datetime.datetime.now(datetime.UTC)
    retention = datetime.timedelta(seconds=acme_env.config.order_retention)
    # Expired, but inside the retention window: kept.
    assert await server.prune_orders(now + ORDER_LIFETIME + retention / 2) == 0
    assert (await store.get(ORDER, ids[0], Order)) is not None
    # Past it: both orders and their authorizations go; the processing one stays.
    later = now + ORDER_LIFETIME + retention + datetime.timedelta(minutes=1)
    assert await server.prune_orders(later) == 2
    for order_id in ids:
        assert await store.get(ORDER, order_id, Order) is None
    for authz_id in authz_ids:
        assert await store.get(AUTHZ, authz_id, Authz) is None
    assert (await store.get(ORDER, busy_id, Order)) is not None
    assert [o.id async for o in store.scan(ORDER, Order)] == [busy_id]
    account_id = client.kid.rsplit("/", 1)[1]
    assert [i for _, i in await store.account_orders(account_id)] == [busy_id]
    # The client sees them gone, and the pass is in the CA's audit stream.
    for url in (done_url, pending_url, pending["authorizations"][0]):
        try:
            await asyncio.to_thread(client.get, url)
        except AcmeError as err:
            assert err.answer.status == 404
        else:
            raise AssertionError(f"{url} still answers")
    assert (await audit_actions(acme_env)).count("acme.orders_pruned") == 1
    # Nothing more to do: a second pass deletes nothing.
    assert await server.prune_orders(later) == 0


def test_the_retention_is_checked_when_the_config_is_read() -> None:
    assert parse_acme({}).order_retention == 30 * 86400
    assert parse_acme({"order_retention_days": 0}).order_retention == 0
    for bad in (-1, 3651, "30", 1.5, True):
        try:
            parse_acme({"order_retention_days": bad})
        except ValueError as exc:
            assert "order_retention_days" in str(exc)
        else:
            raise AssertionError(f"{bad!r} accepted")


async def test_an_account_lists_its_own_orders_a_page_at_a_time(
    acme_env: AcmeEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(acme_server, "ORDERS_PAGE", 2)
    client = acme_env.client(key=ec.generate_private_key(ec.SECP256R1()))
    registered = await asyncio.to_thread(client.register)
    orders_url = registered.json()["orders"]
    made = []
    for name in ("nas.home.arpa", "www.nas.home.arpa", "media.lan", "down.home.arpa"):
        order_url, _ = await asyncio.to_thread(client.new_order, [name])
        made.append(order_url)
    # One of them invalid: RFC 8555 7.1.2.1 leaves those out.
    store = acme_env.server.store
    found = await store.get(ORDER, made[1].rsplit("/", 1)[1], Order)
    assert found is not None
    found[0].status = "invalid"
    await store.update(ORDER, found[0].id, found[0], found[1])

    listed: list[str] = []
    pages = 0
    next_url: str | None = orders_url
    while next_url is not None:
        answer = await asyncio.to_thread(client.get, next_url)
        page = answer.json()["orders"]
        assert len(page) <= 2
        listed += page
        pages += 1
        link = answer.headers.get("link", "")
        next_url = link.split(">", 1)[0].removeprefix("<") if 'rel="next"' in link else None
    assert sorted(listed) == sorted([made[0], made[2], made[3]]) and len(listed) == 3
    assert pages == 2

    # Another account may not read it; a cursor this list never made is refused.
    other = acme_env.client(key=ec.generate_private_key(ec.SECP256R1()))
    await asyncio.to_thread(other.register)
    with pytest.raises(AcmeError) as refused:
        await asyncio.to_thread(other.get, orders_url)
    assert refused.value.answer.status == 403
    assert refused.value.answer.problem_type.endswith(":unauthorized")
    with pytest.raises(AcmeError) as bad:
        await asyncio.to_thread(client.get, orders_url + "/no-cursor")
    assert bad.value.answer.problem_type.endswith(":malformed")
