"""Two brokers on one bus: what one changes, the other enforces.

The docs promise that every broker follows the key registry (`kms_keys`) and the
clients bucket (`kms_clients`) and answers from memory, so a revocation, a disabled or
destroyed key, or a new key policy made through any broker binds every other one. Here
two kms-broker processes share one nats-server, one token and one crypto service
(tests.e2e.conftest.Parts); each change is made through broker A and checked through
broker B (and once the other way round). The follower is asynchronous, so B is polled
with a generous deadline until it refuses; before each change B is shown to allow the
very same call, so a refusal cannot come from anything else.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgekms import errors
from edgekms.v1 import common_pb2 as pb
from mgmt.client import KMSClient
from mgmt.natsserver import free_port
from tests.e2e.conftest import Parts, running_parts

# How long a broker may take to see a change made through another one.
FOLLOW_DEADLINE = 60.0


class TwoBrokers(Parts):
    """The parts' broker ("A", the client config's) and a second one ("B")."""

    second_port: int = 0

    def start_second(self) -> None:
        self.second_port = free_port()
        self.start_broker("broker-b", self.second_port)

    def client_at(self, port: int, cert: bytes, key: bytes) -> KMSClient:
        return KMSClient(
            f"127.0.0.1:{port}",
            ca_cert=(self.root / "client" / "ca.crt").read_bytes(),
            cert=cert,
            key=key,
            server_name="edgekms-broker",
            timeout=30,
        )

    def admin_at(self, port: int) -> KMSClient:
        client = self.root / "client"
        return self.client_at(
            port, (client / "admin.crt").read_bytes(), (client / "admin.key").read_bytes()
        )


@pytest.fixture(scope="module")
def brokers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoBrokers]:
    with running_parts(tmp_path_factory.mktemp("two-brokers"), TwoBrokers) as built:
        built.start_second()
        yield built


@pytest.fixture
def admins(brokers: TwoBrokers) -> Iterator[tuple[KMSClient, KMSClient]]:
    with brokers.admin_at(brokers.broker_port) as a, brokers.admin_at(brokers.second_port) as b:
        yield a, b


def add_signer(brokers: TwoBrokers, via: KMSClient, name: str) -> tuple[bytes, bytes]:
    """A signer registered through `via`; its certificate and key as PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    added = via.add_client(name, "signer", public_key_der=public)
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return added.certificate_pem.encode(), pem_key


def until_refused(
    call: Callable[[], Any], kind: type[errors.KMSError], reason: str
) -> errors.KMSError:
    """Repeat `call` until it is refused with `kind` and `reason`; any other error fails
    at once, and still being allowed after FOLLOW_DEADLINE fails."""
    deadline = time.monotonic() + FOLLOW_DEADLINE
    while True:
        try:
            call()
        except kind as err:
            if err.reason == reason:
                return err
            raise
        if time.monotonic() > deadline:
            raise AssertionError(f"still allowed {FOLLOW_DEADLINE:g}s after the change")
        time.sleep(0.1)


def until_allowed(call: Callable[[], Any], kind: type[errors.KMSError], reason: str) -> Any:
    """Repeat `call` while it is refused with `kind` and `reason`; return its answer."""
    deadline = time.monotonic() + FOLLOW_DEADLINE
    while True:
        try:
            return call()
        except kind as err:
            if err.reason != reason:
                raise
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"still refused {FOLLOW_DEADLINE:g}s after the change"
                ) from err
        time.sleep(0.1)


def test_the_brokers_are_two_processes_on_one_registry(
    brokers: TwoBrokers, admins: tuple[KMSClient, KMSClient]
) -> None:
    a, b = admins
    assert brokers.processes["broker"].pid != brokers.processes["broker-b"].pid
    assert brokers.broker_port != brokers.second_port
    a.create_key("twin/shared", "ec-p256")
    b.get_key("twin/shared")  # a key made through A, served by B
    signature = b.sign("twin/shared", b"through b")
    assert a.verify("twin/shared", b"through b", signature)


def test_revocation_through_one_is_enforced_by_the_other(
    brokers: TwoBrokers, admins: tuple[KMSClient, KMSClient]
) -> None:
    a, _ = admins
    a.create_key("twin/rev", "ec-p256")
    cert, key = add_signer(brokers, a, "twin-rev")
    with brokers.client_at(brokers.second_port, cert, key) as signer_b:
        assert until_allowed(
            lambda: signer_b.sign("twin/rev", b"before"), errors.NotFound, "key.not_found"
        )
        assert signer_b.whoami().client == "twin-rev"
        a.revoke_client("twin-rev")
        until_refused(
            lambda: signer_b.sign("twin/rev", b"after"), errors.Unauthenticated, "auth.revoked"
        )
        with pytest.raises(errors.Unauthenticated) as again:
            signer_b.whoami()
        assert again.value.reason == "auth.revoked"


def test_disable_and_enable_through_one_are_enforced_by_the_other(
    admins: tuple[KMSClient, KMSClient],
) -> None:
    a, b = admins
    a.create_key("twin/dis", "ec-p256")
    until_allowed(lambda: b.sign("twin/dis", b"before"), errors.NotFound, "key.not_found")
    a.disable_key("twin/dis")
    until_refused(
        lambda: b.sign("twin/dis", b"disabled"), errors.FailedPrecondition, "key.disabled"
    )
    assert b.get_key("twin/dis").state == pb.KEY_STATE_DISABLED
    # And the other way round: enabled through B, A signs again.
    with pytest.raises(errors.FailedPrecondition):
        a.sign("twin/dis", b"still disabled at a")
    b.enable_key("twin/dis")
    signature = until_allowed(
        lambda: a.sign("twin/dis", b"enabled"), errors.FailedPrecondition, "key.disabled"
    )
    assert b.verify("twin/dis", b"enabled", signature)


def test_policy_change_through_one_is_enforced_by_the_other(
    brokers: TwoBrokers, admins: tuple[KMSClient, KMSClient]
) -> None:
    a, _ = admins
    a.create_key("twin/pol", "ec-p256")
    cert, key = add_signer(brokers, a, "twin-pol")
    with brokers.client_at(brokers.second_port, cert, key) as signer_b:
        until_allowed(
            lambda: signer_b.sign("twin/pol", b"before"), errors.NotFound, "key.not_found"
        )
        only_others = pb.KeyPolicy(
            rules=[pb.PolicyRule(clients=["someone-else"], operations=[pb.KEY_OPERATION_SIGN])]
        )
        a.update_key_policy("twin/pol", only_others)
        until_refused(
            lambda: signer_b.sign("twin/pol", b"after"),
            errors.PermissionDenied,
            "authz.policy_denied",
        )
        a.update_key_policy("twin/pol", pb.KeyPolicy())  # cleared: the role table decides
        until_allowed(
            lambda: signer_b.sign("twin/pol", b"cleared"),
            errors.PermissionDenied,
            "authz.policy_denied",
        )


def test_destroy_through_one_is_enforced_by_the_other(
    admins: tuple[KMSClient, KMSClient],
) -> None:
    a, b = admins
    a.create_key("twin/des", "ec-p256")
    until_allowed(lambda: b.sign("twin/des", b"before"), errors.NotFound, "key.not_found")
    a.destroy_key("twin/des")
    until_refused(
        lambda: b.sign("twin/des", b"destroyed"), errors.FailedPrecondition, "key.destroyed"
    )
    assert b.get_key("twin/des").state == pb.KEY_STATE_DESTROYED
