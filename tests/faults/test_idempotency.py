"""Request ids against a real stack: a retried create or issue is done once, a reused id
with another body is refused, and a claim left by a broker killed mid-request is taken
over once its lease runs out (the claim is written into kms_requests as that broker
would have left it)."""

from __future__ import annotations

import asyncio
import time
import uuid

import nats
import pytest

from broker.idempotency import IN_PROGRESS, Entry, entry_key, fingerprint
from edgekms.errors import AlreadyExists, InvalidArgument, Unavailable
from edgekms.subjects import IDEMPOTENCY_BUCKET
from edgekms.v1 import common_pb2, keys_pb2
from mgmt.natsauth import BROKER_USER, local_credentials
from tests.e2e.conftest import KmsStack
from tests.faults.conftest import new_csr

pytestmark = pytest.mark.timeout(180)


def test_same_request_id_twice_makes_one_key(fault_stack: KmsStack) -> None:
    rid = uuid.uuid4().hex
    with fault_stack.client() as client:
        first = client.create_key("idem-one", "ec-p256", request_id=rid)
        again = client.create_key("idem-one", "ec-p256", request_id=rid)
        assert again.key_id == first.key_id and again.created_at == first.created_at
        assert [k.name for k in client.list_keys("idem-one")] == ["idem-one"]
        # Without the id the same create is a new request, and the name is taken.
        with pytest.raises(AlreadyExists) as exists:
            client.create_key("idem-one", "ec-p256")
        assert exists.value.reason == "key.exists"


def test_reused_id_with_another_body_is_refused(fault_stack: KmsStack) -> None:
    rid = uuid.uuid4().hex
    with fault_stack.client() as client:
        client.create_key("idem-two", "ec-p256", request_id=rid)
        with pytest.raises(InvalidArgument) as caught:
            client.create_key("idem-two", "ec-p384", request_id=rid)
        assert caught.value.reason == "request.id_reused"
        with pytest.raises(InvalidArgument) as caught:
            client.disable_key("idem-two", request_id=rid)
        assert caught.value.reason == "request.id_reused"
        assert client.get_key("idem-two").state == common_pb2.KEY_STATE_ACTIVE


def test_state_change_retried_is_answered_alike(fault_stack: KmsStack) -> None:
    rid = uuid.uuid4().hex
    with fault_stack.client() as client:
        client.create_key("idem-three", "ec-p256")
        first = client.disable_key("idem-three", request_id=rid)
        client.enable_key("idem-three")
        # The retry answers what the first call did; it does not disable the key again.
        again = client.disable_key("idem-three", request_id=rid)
        assert again.state == first.state == common_pb2.KEY_STATE_DISABLED
        assert client.get_key("idem-three").state == common_pb2.KEY_STATE_ACTIVE


def test_same_request_id_twice_issues_one_certificate(fault_stack: KmsStack) -> None:
    rid = uuid.uuid4().hex
    csr = new_csr("idem-device")
    with fault_stack.client() as client:
        before = len(client.list_certificates())
        first = client.issue_certificate("device", csr, request_id=rid)
        again = client.issue_certificate("device", csr, request_id=rid)
        assert again.record.serial == first.record.serial
        assert again.certificate_der == first.certificate_der
        records = client.list_certificates()
        assert len(records) == before + 1
        assert [r.request_id for r in records if r.serial == first.record.serial] == [rid]
        with pytest.raises(InvalidArgument) as caught:
            client.issue_certificate("device", new_csr("other"), request_id=rid)
        assert caught.value.reason == "request.id_reused"
        assert len(client.list_certificates()) == before + 1


async def _plant_claim(stack: KmsStack, key: str, entry: Entry) -> None:
    options = local_credentials(stack.data_dir, BROKER_USER).connect_options()
    nc = await nats.connect(stack.nats_url.replace("nats://", "tls://"), **options)
    try:
        kv = await nc.jetstream().key_value(IDEMPOTENCY_BUCKET)
        await kv.put(key, entry.encode())
    finally:
        await nc.close()


def test_claim_of_a_dead_broker_is_taken_over(fault_stack: KmsStack) -> None:
    """A broker killed between claim and answer leaves an in-progress claim: retries get
    the retryable request.in_progress while its lease runs, then the work is done once."""
    with fault_stack.client() as client:
        who = client.whoami().client
        live, stale = uuid.uuid4().hex, uuid.uuid4().hex
        for rid, name, age, lease in (
            (live, "idem-live", 0.0, 60.0),
            (stale, "idem-stale", 300.0, 10.0),
        ):
            request = keys_pb2.CreateKeyRequest(
                name=name, key_type=common_pb2.KEY_TYPE_EC_P256, request_id=rid
            )
            at = time.time() - age
            claim = Entry(
                IN_PROGRESS, fingerprint("CreateKey", request), "CreateKey", at, "dead", at + lease
            )
            asyncio.run(_plant_claim(fault_stack, entry_key(who, rid), claim))

        with pytest.raises(Unavailable) as caught:
            client.create_key("idem-live", "ec-p256", request_id=live)
        assert caught.value.reason == "request.in_progress"
        assert client.list_keys("idem-live") == []

        taken = client.create_key("idem-stale", "ec-p256", request_id=stale)
        assert taken.state == common_pb2.KEY_STATE_ACTIVE
        assert client.create_key("idem-stale", "ec-p256", request_id=stale).key_id == taken.key_id


async def _read_entry(stack: KmsStack, key: str) -> Entry:
    options = local_credentials(stack.data_dir, BROKER_USER).connect_options()
    nc = await nats.connect(stack.nats_url.replace("nats://", "tls://"), **options)
    try:
        kv = await nc.jetstream().key_value(IDEMPOTENCY_BUCKET)
        found = await kv.get(key)
        return Entry.decode(found.value or b"{}")
    finally:
        await nc.close()


def test_an_issuance_stores_its_answer_without_a_claim_before_it_answers(
    fault_stack: KmsStack,
) -> None:
    """IssueCertificate writes no claim (the CA's serial decides): one write of the answer,
    made beside the audit record and finished before the caller has the certificate."""
    from edgekms.v1 import ca_pb2

    rid = uuid.uuid4().hex
    csr = new_csr("answer-stored")
    with fault_stack.client() as client:
        who = client.whoami().client
        first = client.issue_certificate("device", csr, request_id=rid)
        entry = asyncio.run(_read_entry(fault_stack, entry_key(who, rid)))
        assert entry.state == "done" and entry.method == "IssueCertificate"
        stored = ca_pb2.IssueCertificateResponse()
        stored.ParseFromString(entry.response)
        assert stored.record.serial == first.record.serial
        # A retry is answered from it.
        assert client.issue_certificate("device", csr, request_id=rid).record.serial == (
            first.record.serial
        )
