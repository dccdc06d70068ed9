"""Unit test of SpiffeAuthority.rotate's rollback (pure logic, fakes for the CA's
parts): the token failing on the second key of a rotation, after the first was made,
recorded and certified, leaves nothing: the first key destroyed, its registry record
forgotten, spiffe.config never written. The real-stack side (a refused rotation changes
nothing) is in test_rotate.py; the token cannot be made to fail half-way there."""

from __future__ import annotations

import asyncio
import datetime
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca_service.spiffe import CONFIG_KEY, SpiffeAuthority
from ca_service.store import rfc3339
from edgekms.errors import Unavailable
from edgekms.v1 import ca_pb2


def _root() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test root")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


@dataclass
class _Entry:
    value: bytes
    revision: int


@dataclass
class FakeKV:
    state: bytes
    updates: list[bytes] = field(default_factory=list)

    async def get(self, key: str) -> _Entry:
        assert key == CONFIG_KEY
        return _Entry(self.state, 7)

    async def update(self, key: str, value: bytes, last: int) -> int:
        self.updates.append(value)
        return last + 1


@dataclass
class FakeKeys:
    fail_on: int
    made: list[bytes] = field(default_factory=list)
    destroyed: list[bytes] = field(default_factory=list)
    refuse: set[bytes] = field(default_factory=set)

    async def generate(self, provider: str, label: str, key_type: Any) -> tuple[bytes, bytes]:
        if len(self.made) + 1 == self.fail_on:
            raise Unavailable("crypto.unavailable", "the token stopped answering")
        public = ec.generate_private_key(ec.SECP256R1()).public_key()
        key_id = f"id-{len(self.made) + 1}".encode()
        self.made.append(key_id)
        der = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return key_id, der

    async def destroy(self, provider: str, key_id: bytes, strict: bool = False) -> None:
        if strict and key_id in self.refuse:
            raise Unavailable("crypto.unavailable", "the token stopped answering")
        self.destroyed.append(key_id)


@dataclass
class FakeRegistry:
    recorded: list[str] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)
    destroyed: list[str] = field(default_factory=list)

    async def record(self, name: str, *args: Any, **kwargs: Any) -> int:
        self.recorded.append(name)
        return len(self.recorded)

    async def forget(self, name: str, revision: int) -> None:
        self.forgotten.append(name)

    async def mark_destroyed(self, name: str) -> bool:
        self.destroyed.append(name)
        return True


class FakeCA:
    def __init__(self, state: ca_pb2.SpiffeState, fail_on: int) -> None:
        self.root_key_, root = _root()
        self.issuer_ = type("Issuer", (), {"root": root})()
        self.store = type("Store", (), {"kv": FakeKV(state.SerializeToString())})()
        self.keys = FakeKeys(fail_on)
        self.registry = FakeRegistry()

    async def issuer(self) -> Any:
        return self.issuer_

    async def root_key(self) -> ec.EllipticCurvePrivateKey:
        return self.root_key_


@pytest.mark.parametrize("fail_on", [1, 2])
async def test_a_token_failure_mid_rotation_leaves_nothing(fail_on: int) -> None:
    state = ca_pb2.SpiffeState(
        trust_domain="home.arpa", provider="hsm0", ca_key_id=b"old-ca", jwt_key_id=b"old-jwt",
        jwt_kid="old", sequence=3,
    )  # fmt: skip
    ca = FakeCA(state, fail_on)
    authority = SpiffeAuthority(ca)  # type: ignore[arg-type]
    request = ca_pb2.SpiffeRotateRequest(
        x509=True, jwt=True, overlap_seconds=60, overlap_set=True, ca_validity_days=10
    )
    with pytest.raises(Unavailable):
        await authority.rotate(request)
    assert ca.store.kv.updates == []  # spiffe.config untouched
    assert ca.keys.destroyed == ca.keys.made  # every key made is gone again
    assert len(ca.keys.made) == fail_on - 1
    assert ca.registry.forgotten == ca.registry.recorded
    if fail_on == 2:
        assert ca.registry.recorded == ["ca/spiffe-2"]


async def test_a_rotation_that_succeeds_retires_both_old_keys() -> None:
    state = ca_pb2.SpiffeState(
        trust_domain="home.arpa", provider="hsm0", ca_key_id=b"old-ca", jwt_key_id=b"old-jwt",
        jwt_kid="old", sequence=3,
    )  # fmt: skip
    ca = FakeCA(state, fail_on=0)
    answer = await SpiffeAuthority(ca).rotate(  # type: ignore[arg-type]
        ca_pb2.SpiffeRotateRequest(
            x509=True, jwt=True, overlap_seconds=0, overlap_set=True, ca_validity_days=10
        )
    )
    assert answer.generation == 2 and answer.jwt_kid != "old"
    assert ca.registry.recorded == ["ca/spiffe-2", "ca/spiffe-jwt-2"]
    written = ca_pb2.SpiffeState()
    written.ParseFromString(ca.store.kv.updates[-1])
    assert written.sequence == 4 and written.ca_key_label == "ca/spiffe-2"
    assert [(r.jwt, r.key_id) for r in written.retired] == [(False, b"old-ca"), (True, b"old-jwt")]
    assert ca.keys.destroyed == []


def _retired_state() -> ca_pb2.SpiffeState:
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    past = rfc3339(now - datetime.timedelta(minutes=1))
    future = rfc3339(now + datetime.timedelta(hours=1))

    def retired(jwt: bool, label: str, key_id: bytes, drop_at: str) -> ca_pb2.SpiffeRetiredKey:
        return ca_pb2.SpiffeRetiredKey(jwt=jwt, key_label=label, key_id=key_id, drop_at=drop_at)

    return ca_pb2.SpiffeState(
        trust_domain="home.arpa", provider="hsm0", ca_key_id=b"ca-3", jwt_key_id=b"jwt-3",
        jwt_kid="k3", sequence=9, generation=3,
        retired=[
            retired(False, "ca/spiffe", b"ca-1", past),
            retired(True, "ca/spiffe-jwt", b"jwt-1", past),
            retired(True, "ca/spiffe-jwt-2", b"jwt-2", future),
        ],
    )  # fmt: skip


async def test_retired_keys_past_their_overlap_are_destroyed_and_dropped() -> None:
    ca = FakeCA(_retired_state(), fail_on=0)
    await SpiffeAuthority(ca)._sweep_retired()  # type: ignore[arg-type]
    assert ca.keys.destroyed == [b"ca-1", b"jwt-1"]  # in the token
    assert ca.registry.destroyed == ["ca/spiffe", "ca/spiffe-jwt"]  # and in the registry
    written = ca_pb2.SpiffeState()
    written.ParseFromString(ca.store.kv.updates[-1])
    # The key still in its overlap stays; nothing else in the state moved.
    assert [r.key_label for r in written.retired] == ["ca/spiffe-jwt-2"]
    assert (written.sequence, written.jwt_kid, written.ca_key_id) == (9, "k3", b"ca-3")


async def test_a_retired_key_the_token_cannot_destroy_stays_listed() -> None:
    ca = FakeCA(_retired_state(), fail_on=0)
    ca.keys.refuse = {b"jwt-1"}
    authority = SpiffeAuthority(ca)  # type: ignore[arg-type]
    await authority._sweep_retired()
    # Not dropped from the state: a later sweep tries again; nothing half-recorded.
    assert ca.store.kv.updates == []
    assert ca.keys.destroyed == [b"ca-1"] and ca.registry.destroyed == ["ca/spiffe"]
    # Not at every state read after a failure: the next try waits SWEEP_RETRY_SECONDS.
    authority._sweep_due(_retired_state())
    assert not authority._sweeping and not authority._tasks
    authority._sweep_after = 0.0
    authority._sweep_due(_retired_state())
    assert authority._sweeping
    await asyncio.gather(*authority._tasks)
    assert not authority._sweeping
