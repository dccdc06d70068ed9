"""`kmsctl up --embedded`: the broker and the CA service share one process, each with its
own bus identity, and the token's crypto service stays a process of its own. Against a
real stack (nats-server, SoftHSM, the services), end to end: sign, issue, audit verify."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

from mgmt.cli import cli
from mgmt.embedded import EXIT_USAGE, main, parse_args
from mgmt.natsserver import free_port
from tests.conftest import SLOWDOWN
from tests.e2e.conftest import BIN, KmsStack, start_stack, stop_stack

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsStack]:
    data_dir = tmp_path_factory.mktemp("embedded") / "data"
    started = start_stack(data_dir, "--embedded")
    yield started
    assert stop_stack(started) == 0, started.log_path.read_text()[-2000:]


def _state(stack: KmsStack) -> dict[str, object]:
    return dict(json.loads((stack.data_dir / "run" / "state.json").read_text()))


def _children(stack: KmsStack) -> dict[str, int]:
    children = _state(stack)["children"]
    assert isinstance(children, dict)
    return {str(name): int(pid) for name, pid in children.items()}


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _kmsctl(stack: KmsStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "kmsctl"), *args],
        env=stack.env(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_ca_runs_inside_the_broker_process_and_the_token_outside(stack: KmsStack) -> None:
    children = _children(stack)
    assert "ca" not in children, "embedded: no CA process of its own"
    assert _state(stack)["embedded"] == {"broker": ["ca"]}
    broker, hsm = children["broker"], children["crypto-hsm0"]
    assert broker != hsm
    assert "mgmt.embedded" in _cmdline(broker)
    assert any(arg.endswith("kms-crypto") for arg in _cmdline(hsm))
    # The token's library is mapped in the crypto service and never in the host of the
    # broker and the CA: the key material is one process boundary away from the network.
    assert "libsofthsm2" in _maps(hsm)
    assert "libsofthsm2" not in _maps(broker)


def test_status_sees_every_part_of_an_embedded_stack(stack: KmsStack) -> None:
    """`kmsctl status` pings the CA on the bus: hosted in the broker's process, it answers."""
    done = _kmsctl(stack, "status", "-o", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "DOWN" not in done.stdout


def test_sign_issue_and_audit_verify_end_to_end(stack: KmsStack, tmp_path: Path) -> None:
    with stack.client() as client:
        client.create_key("embedded/p256", "ec-p256")
        signature = client.sign("embedded/p256", b"signed by an embedded stack")
        assert client.verify("embedded/p256", b"signed by an embedded stack", signature)
    runner = CliRunner()
    base = ["--data-dir", str(stack.data_dir)]
    made = runner.invoke(
        cli, ["ca", "init", "--name", "Board CA", "--out-dir", str(tmp_path / "ca"), *base]
    )
    assert made.exit_code == 0, made.output
    issued = runner.invoke(
        cli,
        [
            "cert", "issue", "--profile", "https-server", "--generate",
            "--cn", "board.home.arpa", "--san", "board.home.arpa",
            "--out", str(tmp_path / "board.crt"), "--key-out", str(tmp_path / "board.key"),
            *base,
        ],
    )  # fmt: skip
    assert issued.exit_code == 0, issued.output
    cert = x509.load_pem_x509_certificates((tmp_path / "board.crt").read_bytes())[0]
    intermediate = x509.load_pem_x509_certificates(
        (tmp_path / "ca" / "intermediate.crt").read_bytes()
    )[0]
    cert.verify_directly_issued_by(intermediate)
    # The CA's HTTP side is served from the same process: the CRL answers.
    with urllib.request.urlopen(f"{stack.ca_url}/crl", timeout=30 * SLOWDOWN) as answer:  # noqa: S310
        crl = x509.load_der_x509_crl(answer.read())
    assert crl.issuer == intermediate.subject
    verified = _kmsctl(stack, "audit", "verify", "-o", "json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    report = json.loads(verified.stdout)
    assert report["ok"] is True, report
    assert report["streams"].get("KMS_AUDIT_BROKER", 0) > 0


def test_a_killed_embedded_process_is_restarted_with_both_services(stack: KmsStack) -> None:
    before = _children(stack)["broker"]
    os.kill(before, signal.SIGKILL)
    deadline = time.monotonic() + 120 * SLOWDOWN
    signed = False
    while time.monotonic() < deadline and not signed:
        after = _children(stack).get("broker")
        if after is not None and after != before:
            try:
                with stack.client(timeout=5) as client:
                    client.sign("embedded/p256", b"after the restart")
                signed = True
            except Exception:  # not listening yet: poll on
                time.sleep(0.5)
        else:
            time.sleep(0.2)
    assert signed, stack.log_path.read_text()[-2000:]
    assert "ca" not in _children(stack)


def test_once_up_the_supervisor_is_the_lean_watcher(stack: KmsStack) -> None:
    """Issue 19: `kmsctl up`'s process, its pid unchanged, is mgmt.upwatch once the
    stack is ready, and has loaded no extension module from site-packages (no
    cryptography, protobuf, grpc, pkcs11): only the standard library's."""
    deadline = time.monotonic() + 60 * SLOWDOWN
    while "mgmt.upwatch" not in _cmdline(stack.process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "mgmt.upwatch" in _cmdline(stack.process.pid)
    assert _state(stack)["pid"] == stack.process.pid
    assert "site-packages" not in _maps(stack.process.pid)
    assert "lean watcher took over" in stack.log_path.read_text()


def test_bad_arguments_are_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--broker-config", "b.toml"]) == EXIT_USAGE
    assert "--ca-config is required" in capsys.readouterr().err
    assert main(["--bogus", "x"]) == EXIT_USAGE
    with pytest.raises(ValueError, match="unexpected argument"):
        parse_args(["--broker-config"])


def test_a_missing_config_is_a_usage_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            str(BIN / "python"), "-m", "mgmt.embedded",
            "--broker-config", str(tmp_path / "none.toml"),
            "--ca-config", str(tmp_path / "none.toml"),
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == EXIT_USAGE, done.stderr
    assert "kms-embedded:" in done.stderr


def test_acme_is_served_from_the_embedded_process(tmp_path: Path) -> None:
    """The CA's ACME server (HTTPS, its own listener) runs on the broker's event loop
    (uvloop) in embedded mode; its directory answers over TLS that chains to the root."""
    acme_port = free_port()
    # Its enrollment port named too: the default (the broker's port + 1) is not checked
    # free, and the module's stack runs beside this one.
    stack = start_stack(
        tmp_path / "data",
        "--embedded",
        "--acme",
        f"127.0.0.1:{acme_port}",
        "--enroll-listen",
        f"127.0.0.1:{free_port()}",
    )
    try:
        made = CliRunner().invoke(
            cli,
            [
                "ca", "init", "--name", "Board CA", "--out-dir", str(tmp_path / "ca"),
                "--data-dir", str(stack.data_dir),
            ],
        )  # fmt: skip
        assert made.exit_code == 0, made.output
        assert "ca" not in _children(stack)
        context = ssl.create_default_context(cafile=str(tmp_path / "ca" / "root.crt"))
        url = f"https://127.0.0.1:{acme_port}/acme/directory"
        deadline = time.monotonic() + 60 * SLOWDOWN
        directory: dict[str, object] = {}
        while not directory:
            try:
                with urllib.request.urlopen(url, timeout=10, context=context) as answer:
                    directory = json.loads(answer.read())
            except OSError:
                # The ACME listener takes its certificate once the CA exists: poll.
                assert time.monotonic() < deadline, stack.log_path.read_text()[-2000:]
                time.sleep(0.5)
        assert str(directory["newNonce"]).startswith(f"https://127.0.0.1:{acme_port}/acme/")
    finally:
        assert stop_stack(stack) == 0
