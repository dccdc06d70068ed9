"""SignBatch and SignStream (issue 19, item 1) on the stack `kmsctl up` starts: every item
is checked, signed and audited as its own Sign, its refusal is its own typed error, and
the call or stream as a whole is refused only when it is not a batch or its caller may
not sign."""

from __future__ import annotations

import hashlib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from edgekms import errors
from edgekms.algorithms import verify_signature
from edgekms.audit import parse_message
from edgekms.v1 import common_pb2 as pb
from edgekms.v1 import keys_pb2
from mgmt.client import KMSClient
from tests.e2e.conftest import BIN, KmsStack

ECDSA256 = pb.SIGNATURE_ALGORITHM_ECDSA_SHA256
ECDSA384 = pb.SIGNATURE_ALGORITHM_ECDSA_SHA384


def _digest(text: str, algorithm: int = ECDSA256) -> bytes:
    h = hashlib.sha384 if algorithm == ECDSA384 else hashlib.sha256
    return h(text.encode()).digest()


def _last_seq(client: KMSClient) -> int:
    for item in client.tail_audit(1, writer="broker"):
        if item.HasField("state"):
            return item.state.last_seq
    raise AssertionError("no state from TailAudit")


def _entries_since(client: KMSClient, after: int) -> list[dict[str, object]]:
    return [
        entry
        for item in client.tail_audit(after + 1, writer="broker")
        if item.HasField("record")
        for entry in parse_message(item.record.raw)
    ]


def _kmsctl(stack: KmsStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "kmsctl"), *args], env=stack.env(), capture_output=True, text=True, timeout=120
    )


def _client_with_role(stack: KmsStack, tmp: Path, name: str, role: str, *extra: str) -> KMSClient:
    out = tmp / name
    done = _kmsctl(stack, "client", "add", name, "--role", role, "--out-dir", str(out), *extra)
    assert done.returncode == 0, done.stderr
    return KMSClient.from_config(out / "config.toml", timeout=60)


@pytest.fixture(scope="module")
def keys(kms_stack: KmsStack) -> dict[str, bytes]:
    """Public keys (DER) of the keys these tests sign with."""
    with kms_stack.client(timeout=60) as admin:
        admin.create_key("many/p256", "ec-p256", provider="hsm0")
        admin.create_key("many/p384", "ec-p384", provider="hsm0")
        admin.create_key("many/off", "ec-p256", provider="hsm0")
        admin.disable_key("many/off")
        return {n: admin.get_public_key(n).der for n in ("many/p256", "many/p384")}


def test_a_batch_signs_each_item_and_refuses_each_bad_one_alone(
    kms_stack: KmsStack, keys: dict[str, bytes]
) -> None:
    good = [("many/p256", ECDSA256, _digest(f"p256 {i}")) for i in range(6)]
    good += [("many/p384", ECDSA384, _digest(f"p384 {i}", ECDSA384)) for i in range(4)]
    bad = [
        ("many/absent", ECDSA256, _digest("absent")),
        ("many/p256", ECDSA256, b"too short"),
        ("many/off", ECDSA256, _digest("disabled")),
    ]
    items = good[:3] + bad[:1] + good[3:7] + bad[1:] + good[7:]
    with kms_stack.client(timeout=60) as client:
        after = _last_seq(client)
        results = client.sign_digests(items)
        entries = _entries_since(client, after)
    assert len(results) == len(items)
    by_item = dict(zip(range(len(items)), results, strict=True))
    for i, (name, algorithm, data) in enumerate(items):
        result = by_item[i]
        if (name, algorithm, data) in good:
            assert isinstance(result, bytes), (i, result)
            assert verify_signature(keys[name], algorithm, data, result), i
    refused = [r for r in results if isinstance(r, errors.KMSError)]
    assert [type(r) for r in refused] == [
        errors.NotFound,
        errors.InvalidArgument,
        errors.FailedPrecondition,
    ]
    assert refused[0].reason == "key.not_found"
    assert refused[2].reason == "key.disabled"

    # One Sign entry per item, with the item's own outcome, each naming its batch; and
    # one entry for the call itself.
    signs = [e for e in entries if e["action"] == "Sign"]
    batches = [e for e in entries if e["action"] == "SignBatch"]
    assert len(batches) == 1 and batches[0]["outcome"] == "ok"
    assert len(signs) == len(items)
    vias = {e["details"]["via"] for e in signs}  # type: ignore[index]
    assert vias == {f"SignBatch:{batches[0]['request_id']}"}
    outcomes = sorted(str(e["outcome"]) for e in signs)
    assert outcomes == sorted(["ok"] * len(good) + [r.reason for r in refused])


def test_a_call_that_is_not_a_batch_is_refused_whole(
    kms_stack: KmsStack, keys: dict[str, bytes]
) -> None:
    item = keys_pb2.SignRequest(name="many/p256", algorithm=ECDSA256, data=_digest("x"))
    with kms_stack.client(timeout=60) as client:
        stub = client._keys
        with pytest.raises(grpc.RpcError) as empty:
            stub.SignBatch(keys_pb2.SignBatchRequest(), timeout=30)
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "batch.empty" in str(empty.value.details())
        with pytest.raises(grpc.RpcError) as big:
            stub.SignBatch(keys_pb2.SignBatchRequest(items=[item] * 1001), timeout=30)
        assert big.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "batch.too_large" in str(big.value.details())
        # The client splits what it is given into batches the broker takes.
        results = client.sign_digests([("many/p256", ECDSA256, _digest("x"))] * 1001)
    assert len(results) == 1001
    for r in results:
        assert isinstance(r, bytes), r
        assert verify_signature(keys["many/p256"], ECDSA256, _digest("x"), r)


def test_roles_and_key_patterns_apply_to_every_item(
    kms_stack: KmsStack, keys: dict[str, bytes], tmp_path: Path
) -> None:
    with kms_stack.client(timeout=60) as admin:
        admin.create_key("many/a1", "ec-p256", provider="hsm0")
    narrow = _client_with_role(kms_stack, tmp_path, "many-signer", "signer", "--keys", "many/a*")
    operator = _client_with_role(kms_stack, tmp_path, "many-operator", "operator")
    with narrow, operator:
        results = narrow.sign_digests(
            [("many/a1", ECDSA256, _digest("a1")), ("many/p256", ECDSA256, _digest("p"))]
        )
        assert isinstance(results[0], bytes)
        assert isinstance(results[1], errors.PermissionDenied)
        assert results[1].reason == "authz.key_pattern"
        with pytest.raises(errors.PermissionDenied) as denied:
            operator.sign_digests([("many/p256", ECDSA256, _digest("p"))])
        assert denied.value.reason == "authz.role_denied"
        with pytest.raises(errors.PermissionDenied) as stream_denied:
            list(operator.sign_stream([("many/p256", ECDSA256, _digest("p"))]))
        assert stream_denied.value.reason == "authz.role_denied"


def test_a_stream_answers_every_request_past_its_window(
    kms_stack: KmsStack, keys: dict[str, bytes]
) -> None:
    n = 600  # more than the broker works on at once (256)
    items = [("many/p256", ECDSA256, _digest(f"stream {i}")) for i in range(n)]
    with kms_stack.client(timeout=120) as client:
        after = _last_seq(client)
        answers = dict(client.sign_stream(iter(items), timeout=120))
        entries = _entries_since(client, after)
    assert sorted(answers) == list(range(n))
    for i, (name, algorithm, data) in enumerate(items):
        signature = answers[i]
        assert isinstance(signature, bytes), (i, signature)
        assert verify_signature(keys[name], algorithm, data, signature), i
    streams = [e for e in entries if e["action"] == "SignStream"]
    assert len(streams) == 1
    signs = [e for e in entries if e["action"] == "Sign"]
    assert len(signs) == n
    assert {e["details"]["via"] for e in signs} == {  # type: ignore[index]
        f"SignStream:{streams[0]['request_id']}"
    }


def test_a_stream_message_that_does_not_parse_is_that_items_error(
    kms_stack: KmsStack, keys: dict[str, bytes]
) -> None:
    good = keys_pb2.SignRequest(name="many/p256", algorithm=ECDSA256, data=_digest("ok"))
    # Field 1 (name) announcing 255 bytes that never come: not a SignRequest.
    raw = [good.SerializeToString(), b"\x0a\xff", good.SerializeToString()]
    with kms_stack.client(timeout=60) as client:
        call = client._channel.stream_stream(
            "/edgekms.v1.KeyService/SignStream",
            request_serializer=lambda b: b,
            response_deserializer=keys_pb2.SignStreamResponse.FromString,
        )
        answers = {r.index: r.result for r in call(iter(raw), timeout=60)}
    assert sorted(answers) == [0, 1, 2]
    assert answers[1].WhichOneof("outcome") == "error"
    assert answers[1].error.reason == "request.malformed"
    for i in (0, 2):
        assert answers[i].WhichOneof("outcome") == "signature"


def test_a_client_revoked_while_its_stream_is_open_gets_no_more_signatures(
    kms_stack: KmsStack, keys: dict[str, bytes], tmp_path: Path
) -> None:
    signer = _client_with_role(kms_stack, tmp_path, "many-revoked", "signer")
    first_answered = threading.Event()

    def requests() -> Iterator[tuple[str, pb.SignatureAlgorithm.ValueType, bytes]]:
        yield ("many/p256", ECDSA256, _digest("before"))
        assert first_answered.wait(60)
        yield ("many/p256", ECDSA256, _digest("after"))

    answers: dict[int, bytes | errors.KMSError] = {}
    with signer:
        for index, result in signer.sign_stream(requests(), timeout=120):
            answers[index] = result
            if index == 0:
                with kms_stack.client(timeout=60) as admin:
                    admin.revoke_client(name="many-revoked")
                first_answered.set()
    assert isinstance(answers[0], bytes)
    assert isinstance(answers[1], errors.KMSError), answers[1]
    assert "revoked" in answers[1].reason


def test_a_cancelled_stream_leaves_the_broker_serving(
    kms_stack: KmsStack, keys: dict[str, bytes]
) -> None:
    stop = threading.Event()

    def endless() -> Iterator[keys_pb2.SignRequest]:
        i = 0
        while not stop.is_set():
            yield keys_pb2.SignRequest(
                name="many/p256", algorithm=ECDSA256, data=_digest(f"endless {i}")
            )
            i += 1

    with kms_stack.client(timeout=60) as client:
        call = client._keys.SignStream(endless(), timeout=120)
        seen = 0
        for _ in call:
            seen += 1
            if seen == 50:
                call.cancel()  # type: ignore[no-untyped-call]
                break
        stop.set()
        assert seen == 50
        # The broker carries on: a unary Sign and a new batch both work.
        signature = client.sign_digest("many/p256", ECDSA256, _digest("after cancel"))
        assert verify_signature(keys["many/p256"], ECDSA256, _digest("after cancel"), signature)
        assert isinstance(client.sign_digests([("many/p256", ECDSA256, _digest("b"))])[0], bytes)


def test_kmsctl_signs_many_files_in_one_batch(
    kms_stack: KmsStack, keys: dict[str, bytes], tmp_path: Path
) -> None:
    files = []
    for i in range(3):
        f = tmp_path / f"file{i}.txt"
        f.write_text(f"content {i}\n")
        files.append(f)
    args = [a for f in files for a in ("--in", str(f))]
    done = _kmsctl(kms_stack, "key", "sign", "many/p256", *args, "--out-dir", str(tmp_path / "s"))
    assert done.returncode == 0, done.stderr
    for f in files:
        signature = (tmp_path / "s" / f"{f.name}.sig").read_bytes()
        digest = hashlib.sha256(f.read_bytes()).digest()
        assert verify_signature(keys["many/p256"], ECDSA256, digest, signature)
    clash = _kmsctl(kms_stack, "key", "sign", "many/p256", *args, "--out", str(tmp_path / "x"))
    assert clash.returncode == 2
    assert "--out-dir" in clash.stderr
    assert not (tmp_path / "x").exists()


RSA_PKCS1 = pb.SIGNATURE_ALGORITHM_RSA_PKCS1_SHA256
ED25519 = pb.SIGNATURE_ALGORITHM_ED25519


@pytest.fixture(scope="module")
def chunk_keys(kms_stack: KmsStack) -> dict[str, bytes]:
    """Keys for the chunked path: signing keys of three types, an encryption key, and a
    key whose policy lets only signers (not the admin these tests run as) sign."""
    only_signers = pb.KeyPolicy(
        rules=[pb.PolicyRule(roles=["signer"], operations=[pb.KEY_OPERATION_SIGN])]
    )
    with kms_stack.client(timeout=60) as admin:
        admin.create_key("chunk/p256", "ec-p256", provider="hsm0")
        admin.create_key("chunk/rsa", "rsa-2048", provider="hsm0")
        admin.create_key("chunk/ed", "ed25519", provider="hsm0")
        admin.create_key("chunk/aes", "aes-256", provider="hsm0")
        admin.create_key("chunk/locked", "ec-p256", provider="hsm0", policy=only_signers)
        return {n: admin.get_public_key(n).der for n in ("chunk/p256", "chunk/rsa", "chunk/ed")}


def test_per_item_errors_in_every_chunk_beside_signatures_each_audited(
    kms_stack: KmsStack, chunk_keys: dict[str, bytes]
) -> None:
    """Issue 19: 400 items cross several crypto-service chunks (128 items each); each
    refusal kind lands on its own item only, every good item is signed by its own key,
    and each item is one Sign entry with its own outcome and request id."""
    # One policy refusal per chunk (128 items): the broker throttles a caller after ten.
    LOCKED_AT = {3, 201, 390}
    long_message = b"m" * (10 * 1024)  # beyond a chunk's per-item size: sent alone
    refusals = {
        0: (("chunk/absent", ECDSA256, _digest("a")), errors.NotFound, "key.not_found"),
        1: (("chunk/p256", RSA_PKCS1, _digest("b")), errors.InvalidArgument, ""),
        2: (("chunk/aes", ECDSA256, _digest("c")), errors.InvalidArgument, ""),
        3: (("chunk/locked", ECDSA256, _digest("d")), errors.PermissionDenied, ""),
        4: (("chunk/p256", ECDSA256, b"short"), errors.InvalidArgument, "sign.digest_length"),
    }
    items: list[tuple[str, int, bytes]] = []
    expected: dict[int, tuple[type[errors.KMSError], str]] = {}
    for i in range(400):
        kind = i % 9
        if kind == 3 and i not in LOCKED_AT:
            kind = 8  # refusals of permission count against the caller: only a few
        if kind in refusals:
            item, error_type, reason = refusals[kind]
            expected[i] = (error_type, reason)
            items.append(item)
        elif kind == 5:
            items.append(("chunk/rsa", RSA_PKCS1, _digest(f"rsa {i}")))
        elif kind == 6 and i < 100:
            items.append(("chunk/ed", ED25519, long_message + str(i).encode()))
        else:
            items.append(("chunk/p256", ECDSA256, _digest(f"p256 {i}")))
    with kms_stack.client(timeout=120) as client:
        after = _last_seq(client)
        results = client.sign_digests(items)  # type: ignore[arg-type]
        entries = _entries_since(client, after)
    assert len(results) == len(items)
    for i, ((name, algorithm, data), result) in enumerate(zip(items, results, strict=True)):
        if i in expected:
            error_type, reason = expected[i]
            assert isinstance(result, error_type), (i, result)
            assert not reason or result.reason == reason, (i, result.reason)
        else:
            assert isinstance(result, bytes), (i, name, result)
            assert verify_signature(chunk_keys[name], algorithm, data, result), (i, name)  # type: ignore[arg-type]
    reasons = {i: r.reason for i, r in enumerate(results) if isinstance(r, errors.KMSError)}
    assert [i for i, r in reasons.items() if r == "authz.policy_denied"] == sorted(LOCKED_AT)
    assert reasons[2] == "key.usage_mismatch"
    assert reasons[1] == "sign.algorithm_mismatch"

    batches = [e for e in entries if e["action"] == "SignBatch"]
    assert len(batches) == 1
    batch_id = batches[0]["request_id"]
    signs = [e for e in entries if e["action"] == "Sign"]
    assert len(signs) == len(items)
    by_id = {str(e["request_id"]): e for e in signs}
    assert sorted(by_id) == sorted(f"{batch_id}.{i}" for i in range(len(items)))
    for i, (name, _, _) in enumerate(items):
        entry = by_id[f"{batch_id}.{i}"]
        assert entry["target"] == name
        assert entry["outcome"] == reasons.get(i, "ok"), i
        assert entry["details"]["via"] == f"SignBatch:{batch_id}"  # type: ignore[index]
    verified = _kmsctl(kms_stack, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_an_items_own_request_id_is_kept_and_an_oversized_one_refused(
    kms_stack: KmsStack, chunk_keys: dict[str, bytes]
) -> None:
    good = keys_pb2.SignRequest(
        name="chunk/p256", algorithm=ECDSA256, data=_digest("own id"), request_id="mine-1"
    )
    long_id = keys_pb2.SignRequest(
        name="chunk/p256", algorithm=ECDSA256, data=_digest("long id"), request_id="x" * 129
    )
    with kms_stack.client(timeout=60) as client:
        after = _last_seq(client)
        reply = client._keys.SignBatch(keys_pb2.SignBatchRequest(items=[good, long_id]), timeout=60)
        entries = _entries_since(client, after)
    assert reply.results[0].WhichOneof("outcome") == "signature"
    assert reply.results[0].signature.key_name == "chunk/p256"
    assert reply.results[1].WhichOneof("outcome") == "error"
    assert reply.results[1].error.reason == "request.id_invalid"
    signs = [e for e in entries if e["action"] == "Sign"]
    # Entries are stored as decisions are made (a refusal before a signature), so by id:
    outcomes = {str(e["request_id"]): str(e["outcome"]) for e in signs}
    assert len(outcomes) == 2 and outcomes.pop("mine-1") == "ok"
    [(broker_id, outcome)] = outcomes.items()
    assert outcome == "request.id_invalid"
    assert broker_id.endswith(".1") and "x" * 129 not in broker_id  # never the oversized id


def _wait_for_signs(client: KMSClient, after: int, count: int) -> list[dict[str, object]]:
    """Poll the log until `count` Sign entries past `after` are there (generous deadline:
    the broker records a cancelled batch after the caller has gone)."""
    deadline = time.monotonic() + 60
    while True:
        signs = [e for e in _entries_since(client, after) if e["action"] == "Sign"]
        if len(signs) >= count or time.monotonic() > deadline:
            return signs
        time.sleep(0.1)


def test_a_batch_whose_deadline_passes_signs_nothing_unrecorded(
    kms_stack: KmsStack, chunk_keys: dict[str, bytes]
) -> None:
    """A caller whose deadline passes mid-batch gets DEADLINE_EXCEEDED; each item is
    still one Sign entry (signed-and-answered ones "ok", the rest cancelled or past the
    deadline), the chain verifies, and the broker goes on serving batches."""
    items = [
        keys_pb2.SignRequest(name="chunk/rsa", algorithm=RSA_PKCS1, data=_digest(f"late {i}"))
        for i in range(1000)
    ]
    with kms_stack.client(timeout=60) as client:
        after = _last_seq(client)
        with pytest.raises(grpc.RpcError) as late:
            client._keys.SignBatch(keys_pb2.SignBatchRequest(items=items), timeout=0.2)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        signs = _wait_for_signs(client, after, len(items))
        assert len(signs) == len(items)
        outcomes = {str(e["outcome"]) for e in signs}
        assert outcomes <= {"ok", "request.cancelled", "provider.deadline"}, outcomes
        assert outcomes != {"ok"}
        again = client.sign_digests([("chunk/p256", ECDSA256, _digest("after deadline"))])
        assert isinstance(again[0], bytes)
        assert verify_signature(
            chunk_keys["chunk/p256"], ECDSA256, _digest("after deadline"), again[0]
        )
    verified = _kmsctl(kms_stack, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_cancelled_batch_is_recorded_and_the_broker_serves_on(
    kms_stack: KmsStack, chunk_keys: dict[str, bytes]
) -> None:
    """RSA-4096 signatures take milliseconds each, so 1,000 of them outlast the half
    second before the caller cancels: the items not yet answered are recorded as
    request.cancelled, none is left out of the log, and the next batch is served."""
    with kms_stack.client(timeout=120) as admin:
        admin.create_key("chunk/rsa4096", "rsa-4096", provider="hsm0")
    items = [
        keys_pb2.SignRequest(name="chunk/rsa4096", algorithm=RSA_PKCS1, data=_digest(f"gone {i}"))
        for i in range(1000)
    ]
    with kms_stack.client(timeout=60) as client:
        warm = client.sign_digests([("chunk/rsa4096", RSA_PKCS1, _digest("warm"))])
        assert isinstance(warm[0], bytes)  # the channel is up before the timed part
        after = _last_seq(client)
        call = client._keys.SignBatch.future(keys_pb2.SignBatchRequest(items=items), timeout=120)
        time.sleep(0.5)  # lets the request reach the broker; nothing is asserted on time
        call.cancel()  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.FutureCancelledError):
            call.result()
        signs = _wait_for_signs(client, after, len(items))
        assert len(signs) == len(items)
        outcomes = {str(e["outcome"]) for e in signs}
        assert "request.cancelled" in outcomes
        assert outcomes <= {"ok", "request.cancelled"}
        again = client.sign_digests([("chunk/p256", ECDSA256, _digest("after cancel"))])
        assert isinstance(again[0], bytes)
    verified = _kmsctl(kms_stack, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
