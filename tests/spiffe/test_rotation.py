"""Rotation and faults against the real stack: an SVID with a short TTL is renewed at
half its lifetime and pushed on the open FetchX509SVID stream; with the KMS away at
rotation time the agent keeps serving the current SVID, retries, and rotates once the
KMS is back; a device that is denied gets its streams ended with an error and no new
SVID."""

from __future__ import annotations

from tests.spiffe.conftest import (
    TRUST_DOMAIN,
    Agent,
    SpiffeStack,
    device_behind_relay,
    read_json_line,
    wait_for,
    workload,
    workload_process,
)


def test_rotation_is_pushed_and_survives_the_kms_being_away(spiffe_stack: SpiffeStack) -> None:
    config, relay = device_behind_relay(spiffe_stack, "nas-rotate")
    rotating = f"spiffe://{TRUST_DOMAIN}/rotating"
    spiffe_stack.entry(rotating, "unix:uid:1041", ttl="20s", node="nas-rotate")
    agent = Agent(config, spiffe_stack.root / "agent-rotate")
    stream = None
    try:
        wait_for(lambda: "svids" in workload(agent.socket, 1041, 1041, "x509"), 60, "an SVID")
        stream = workload_process(agent.socket, 1041, 1041, "stream", "10")
        first = read_json_line(stream)["svids"][0]
        assert first["spiffe_id"] == rotating
        assert 19 <= first["not_after"] - first["not_before"] <= 21
        # Half of 20 s later a new SVID arrives on the same stream, unasked.
        second = read_json_line(stream, timeout=60)["svids"][0]
        assert second["serial"] != first["serial"] and second["spiffe_id"] == rotating
        assert second["not_after"] > first["not_after"]

        relay.cut()
        wait_for(lambda: agent.events("spiffe_rotation_retry"), 60, "a rotation retry")
        # Still served, from the agent alone: the current SVID, not yet expired.
        during = workload(agent.socket, 1041, 1041, "x509")
        assert during["svids"][0]["serial"] == second["serial"], during
        relay.restore()
        third = read_json_line(stream, timeout=60)["svids"][0]
        assert third["serial"] not in (first["serial"], second["serial"])
        assert agent.events("spiffe_svid_rotated")
    finally:
        if stream is not None:
            stream.kill()
            stream.wait()
        agent.stop()
        relay.close()


def test_a_denied_devices_streams_end_with_an_error(spiffe_stack: SpiffeStack) -> None:
    config, relay = device_behind_relay(spiffe_stack, "nas-denied")
    spiffe_stack.entry(f"spiffe://{TRUST_DOMAIN}/doomed", "unix:uid:1051", node="nas-denied")
    agent = Agent(config, spiffe_stack.root / "agent-denied")
    stream = None
    try:
        wait_for(lambda: "svids" in workload(agent.socket, 1051, 1051, "x509"), 60, "an SVID")
        stream = workload_process(agent.socket, 1051, 1051, "stream", "10")
        assert read_json_line(stream)["svids"][0]["spiffe_id"].endswith("/doomed")
        spiffe_stack.kmsctl("device", "deny", "nas-denied")
        ended = read_json_line(stream, timeout=60)
        assert ended["error"] == "PERMISSION_DENIED", ended
        assert stream.wait(30) == 0
        again = workload(agent.socket, 1051, 1051, "x509")
        assert again["error"] == "PERMISSION_DENIED", again
        assert agent.events("spiffe_device_refused")
    finally:
        if stream is not None and stream.poll() is None:
            stream.kill()
            stream.wait()
        agent.stop()
        relay.close()
