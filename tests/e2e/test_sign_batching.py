"""Sign batching seen from outside, on the stack `kmsctl up` starts: many concurrent gRPC
Signs (which the broker may coalesce into SignBatch messages) each get a signature over
their own digest, and each is still one audit record of its own."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

from edgekms.algorithms import verify_signature
from edgekms.audit import parse_message
from edgekms.v1 import common_pb2 as pb
from mgmt.client import KMSClient
from tests.e2e.conftest import KmsStack

ECDSA = pb.SIGNATURE_ALGORITHM_ECDSA_SHA256


def _last_seq(client: KMSClient) -> int:
    for item in client.tail_audit(1, writer="broker"):
        if item.HasField("state"):
            return item.state.last_seq
    raise AssertionError("no state from TailAudit")


def test_concurrent_signs_each_verify_and_are_each_audited(kms_stack: KmsStack) -> None:
    n = 48
    with kms_stack.client(timeout=60) as client:
        client.create_key("batching/p256", "ec-p256", provider="hsm0")
        der = client.get_public_key("batching/p256").der
        after = _last_seq(client)
        digests = [hashlib.sha256(f"concurrent {i}".encode()).digest() for i in range(n)]
        with ThreadPoolExecutor(max_workers=16) as pool:
            signatures = list(
                pool.map(lambda d: client.sign_digest("batching/p256", ECDSA, d), digests)
            )
        for i, (digest, signature) in enumerate(zip(digests, signatures, strict=True)):
            assert verify_signature(der, ECDSA, digest, signature), i
        signs = [
            entry
            for item in client.tail_audit(after + 1, writer="broker")
            if item.HasField("record")
            for entry in parse_message(item.record.raw)
            if entry["action"] == "Sign"
        ]
    assert len(signs) == n
    assert {entry["target"] for entry in signs} == {"batching/p256"}
    assert {entry["outcome"] for entry in signs} == {"ok"}
