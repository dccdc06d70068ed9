"""Clients that fail over: a client config listing two brokers keeps working when the
first one is killed, and no state change is done twice.

Two kms-broker processes share one bus, token and crypto service (tests.e2e.conftest
Parts, as in test_two_brokers.py); the brokers share the idempotency bucket, which is
what makes a request id good at any broker. Broker A is killed with SIGKILL; then
  - a read and a Sign move to broker B and stay there;
  - CreateKey resent with the request id its first (answered) attempt had gets the
    first attempt's answer from B: one key, not two;
  - CreateEnrollToken, which has no request id, is sent once: the client moves to B
    before sending, because A cannot be reached, and exactly one token appears;
  - `kmsctl` with the same config (`brokers = [...]`) answers through B.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator

import pytest

from edgekms.errors import Unavailable
from mgmt.client import KMSClient
from mgmt.natsserver import free_port
from tests.conftest import SLOWDOWN
from tests.e2e.conftest import BIN, Parts, running_parts


class FailoverParts(Parts):
    second_port: int = 0

    def start_second(self) -> None:
        self.second_port = free_port()
        self.start_broker("broker-b", self.second_port)

    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{self.broker_port}", f"127.0.0.1:{self.second_port}"]

    def admin(self, targets: list[str]) -> KMSClient:
        client = self.root / "client"
        return KMSClient(
            targets,
            ca_cert=(client / "ca.crt").read_bytes(),
            cert=(client / "admin.crt").read_bytes(),
            key=(client / "admin.key").read_bytes(),
            server_name="edgekms-broker",
            timeout=30 * SLOWDOWN,
        )


@pytest.fixture
def parts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FailoverParts]:
    with running_parts(tmp_path_factory.mktemp("failover"), FailoverParts) as built:
        built.start_second()
        yield built


def test_a_killed_broker_is_passed_over_and_nothing_is_done_twice(
    parts: FailoverParts,
) -> None:
    a, b = parts.addresses()
    with parts.admin([a, b]) as client:
        first = client.create_key("fo/key", "ec-p256", request_id="fo-create-1")
        assert client.target == a
        parts.stop("broker", signal.SIGKILL)

        assert client.sign("fo/key", b"after the kill")
        assert client.target == b
        again = client.create_key("fo/key", "ec-p256", request_id="fo-create-1")
        assert again.key_id == first.key_id
        assert [k.name for k in client.list_keys() if k.name == "fo/key"] == ["fo/key"]
        tokens_before = len(list(client.iter_enroll_tokens()))

    # A fresh client prefers the dead broker: the change without a request id is sent
    # once, to the broker it could reach.
    with parts.admin([a, b]) as fresh:
        fresh.create_enroll_token("fo-device")
        assert fresh.target == b
        tokens = [t for t in fresh.iter_enroll_tokens() if t.name == "fo-device"]
        assert len(tokens) == 1
        assert len(list(fresh.iter_enroll_tokens())) == tokens_before + 1

    # With only the dead broker there is nowhere to go: a typed UNAVAILABLE.
    with parts.admin([a]) as alone, pytest.raises(Unavailable):
        alone.get_key("fo/key")

    # kmsctl reads the list from the client config.
    config = parts.root / "client" / "failover.toml"
    base = (parts.root / "client" / "config.toml").read_text()
    config.write_text(
        "\n".join(line for line in base.splitlines() if not line.startswith("broker"))
        + f'\nbroker = "{a}"\nbrokers = ["{b}"]\n'
    )
    done = subprocess.run(
        [str(BIN / "kmsctl"), "key", "list", "--config", str(config), "-o", "json"],
        capture_output=True,
        text=True,
        timeout=120 * SLOWDOWN,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    names = [k["name"] for k in json.loads(done.stdout)]
    assert "fo/key" in names
