"""Unit tests of the pure logic: the broker's failure throttle, the TPM AuthGuard, key
patterns and the `--allow` rule syntax (a fake clock; no processes needed)."""

from __future__ import annotations

import pytest

from broker.authz import check_policy_rules
from broker.clients import check_key_pattern, key_matches
from broker.throttle import FailureThrottle
from crypto_service.throttle import AuthGuard
from edgekms.errors import InvalidArgument, PermissionDenied, ResourceExhausted
from edgekms.v1 import common_pb2 as pb
from mgmt.cli.policy import parse_rule


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failure_throttle_blocks_then_backs_off_longer() -> None:
    clock = Clock()
    throttle = FailureThrottle(max_failures=3, window=60, backoff=5, clock=clock)
    for _ in range(2):
        throttle.failed("client:a")
        throttle.check("client:a")
    throttle.failed("client:a")
    with pytest.raises(ResourceExhausted) as first:
        throttle.check("client:a")
    assert first.value.details["retry_after_seconds"] == "5"
    throttle.check("client:b")  # others unaffected
    clock.now += 6
    throttle.check("client:a")
    for _ in range(3):
        throttle.failed("client:a")
    with pytest.raises(ResourceExhausted) as second:
        throttle.check("client:a")
    assert second.value.details["retry_after_seconds"] == "10"


def test_failures_outside_the_window_are_forgotten() -> None:
    clock = Clock()
    throttle = FailureThrottle(max_failures=2, window=10, clock=clock)
    throttle.failed("x")
    clock.now += 11
    throttle.failed("x")
    throttle.check("x")
    assert throttle.failures("x") == 1


def test_auth_guard_counts_only_auth_failures_and_honours_lockout() -> None:
    clock = Clock()
    guard = AuthGuard(max_failures=2, window=100, max_total=3, clock=clock)
    key, other, third = b"k1", b"k2", b"k3"
    guard.observe(key, PermissionDenied("authz.policy_denied", "not a TPM answer"))
    guard.check(key)
    guard.observe(key, PermissionDenied("tpm.auth_failed", "wrong"))
    guard.check(key)
    guard.observe(key, PermissionDenied("tpm.auth_failed", "wrong"))
    with pytest.raises(ResourceExhausted):
        guard.check(key)
    guard.observe(other, PermissionDenied("tpm.auth_failed", "wrong"))
    with pytest.raises(ResourceExhausted):  # the provider-wide budget is spent
        guard.check(other)
    guard.check(third)  # never failed: not known to need an auth value
    clock.now += 101
    guard.check(key)
    from edgekms.errors import FailedPrecondition

    guard.observe(third, FailedPrecondition("tpm.lockout", "x", {"retry_after_seconds": "30"}))
    with pytest.raises(ResourceExhausted) as locked:
        guard.check(third)
    assert locked.value.details["retry_after_seconds"] == "30"


def test_key_patterns() -> None:
    assert key_matches("", "anything/at/all")
    assert key_matches("nas/*", "nas/https")
    assert not key_matches("nas/*", "vpn/x")
    assert not key_matches("nas/*", "NAS/https")
    check_key_pattern("nas/[ab]*")
    with pytest.raises(InvalidArgument):
        check_key_pattern("nas/$(rm)")


def test_parse_rule() -> None:
    rule = parse_rule("signer:sign,verify:ecdsa-sha256,ecdsa-sha384")
    assert list(rule.roles) == ["signer"] and not rule.clients
    assert list(rule.operations) == [pb.KEY_OPERATION_SIGN, pb.KEY_OPERATION_VERIFY]
    assert len(rule.algorithms) == 2
    assert list(parse_rule("nas-backup:pubkey").clients) == ["nas-backup"]
    for bad in ("signer", "signer:fly", "Bad Name:sign", "signer:sign:md5", "a:b:c:d"):
        with pytest.raises(InvalidArgument):
            parse_rule(bad)


def test_check_policy_rules() -> None:
    good = pb.KeyPolicy(rules=[parse_rule("signer:sign:ecdsa-sha256")])
    check_policy_rules(good, pb.KEY_TYPE_EC_P256)
    with pytest.raises(InvalidArgument) as mismatch:
        check_policy_rules(good, pb.KEY_TYPE_RSA_2048)
    assert mismatch.value.reason == "policy.algorithm_mismatch"
    nobody = pb.KeyPolicy(rules=[pb.PolicyRule(operations=[pb.KEY_OPERATION_SIGN])])
    with pytest.raises(InvalidArgument):
        check_policy_rules(nobody, pb.KEY_TYPE_EC_P256)
