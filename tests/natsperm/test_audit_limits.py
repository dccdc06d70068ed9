"""A deployment's audit limits on a live `kmsctl up` (issue 11, item 4): each writer's
stream is bounded on its own (`--audit-limit`), `kmsctl status` names the writer that is
nearly full and then full, and a full CA stream leaves the broker signing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.js.errors
import pytest

from edgekms.audit import STREAM_FULL, parse_limit
from edgekms.errors import InvalidArgument
from tests.e2e.conftest import KmsStack, start_stack, stop_stack
from tests.natsperm.test_stack_auth import _creds

pytestmark = pytest.mark.timeout(240)

KMSCTL = str(Path(sys.executable).parent / "kmsctl")
CA_LIMIT = 512 * 1024
JUNK = b"j" * (16 * 1024)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsStack]:
    running = start_stack(
        tmp_path_factory.mktemp("auditlimits") / "data",
        "--audit-limit",
        "ca=512KiB",
        # The archiver's first round runs at start, the next an hour later: this test
        # is about a stream that archiving does not keep up with (tests/e2e/
        # test_audit_retention.py is the one where it does).
        "--audit-archive-interval",
        "3600",
    )
    try:
        yield running
    finally:
        assert stop_stack(running) == 0


def _status(stack: KmsStack) -> tuple[int, dict[str, dict[str, object]]]:
    result = subprocess.run(
        [KMSCTL, "status", "-o", "json"],
        env=stack.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    components = {c["name"]: c for c in json.loads(result.stdout)["components"]}
    return result.returncode, components


async def _junk(stack: KmsStack, count: int | None) -> int:
    """Publish junk as the CA's bus identity: `count` big messages, or (None) until
    even a small one is refused. How many were stored."""
    nc = await nats.connect(
        stack.nats_url, allow_reconnect=False, **_creds(stack, "ca").connect_options()
    )
    try:
        js = nc.jetstream(timeout=10)
        stored = 0
        for size in (len(JUNK),) if count is not None else (len(JUNK), 1024, 64):
            while count is None or stored < count:
                try:
                    await js.publish("kms.audit.ca", JUNK[:size])
                except nats.js.errors.APIError as exc:
                    assert exc.err_code == STREAM_FULL, exc
                    break
                stored += 1
        return stored
    finally:
        await nc.close()


def test_status_warns_then_names_the_full_writer_and_signing_goes_on(stack: KmsStack) -> None:
    code, components = _status(stack)
    assert code == 0, components
    assert {"audit/broker", "audit/ca", "audit/crypto-hsm0"} <= components.keys()
    assert str(components["audit/ca"]["detail"]).startswith("0%")
    # 85% of the CA's stream: a warning, still ok.
    asyncio.run(_junk(stack, int(CA_LIMIT * 0.85) // len(JUNK)))
    code, components = _status(stack)
    assert code == 0, components
    assert components["audit/ca"]["ok"] is True
    assert str(components["audit/ca"]["detail"]).startswith("warning, nearly full")
    # Then full: refused by the server, named by status, exit 8 (unavailable).
    asyncio.run(_junk(stack, None))
    code, components = _status(stack)
    assert code == 8, components
    assert components["audit/ca"]["ok"] is False
    assert str(components["audit/ca"]["detail"]).startswith("FULL")
    assert components["audit/broker"]["ok"] is True
    text = subprocess.run(
        [KMSCTL, "status"], env=stack.env(), capture_output=True, text=True, timeout=120
    )
    assert any(line.split()[:2] == ["audit/ca", "FULL"] for line in text.stdout.splitlines()), (
        text.stdout
    )
    # The broker's own stream is untouched: its decisions are recorded and signing works.
    with stack.client(timeout=30) as client:
        client.create_key("limits/key", "ec-p256")
        assert client.sign("limits/key", b"after the CA filled its stream")


def test_a_malformed_audit_limit_is_a_usage_error(tmp_path: Path) -> None:
    for value in ("ca", "ca=12XB", "ca=1KiB", "CA.x=1GiB", "ca=1GiB/0", "=1GiB"):
        with pytest.raises(InvalidArgument) as info:
            parse_limit(value)
        assert info.value.reason == "audit.limit_invalid", value
    assert parse_limit("crypto-hsm0=64MiB/1000") == ("crypto-hsm0", 64 * 1024**2, 1000)
    result = subprocess.run(
        [KMSCTL, "up", "--data-dir", str(tmp_path / "never"), "--audit-limit", "ca=1KiB"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "audit.limit_invalid" in result.stderr
    assert not (tmp_path / "never").exists()  # nothing started, nothing made
