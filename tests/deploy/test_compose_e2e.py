"""The compose stack end to end: images built (cached between runs), `compose up`, then,
as kmsctl on the host would, sign with a key in SoftHSM and have the CA issue a
certificate, both through the broker's published port; and every container read-only,
without capabilities, not root.

It runs against whichever engine tests/deploy/engine.py finds: a Docker engine that
answers, or here podman through its Docker API (started and stopped by the harness).
Readiness is the harness's own: it runs each service's healthcheck command by `exec`
until all pass, since podman without systemd never runs them on a schedule. Where no
engine can run it skips, saying why. The same paths without containers are proven by the
process-based tests (tests/e2e: broker + crypto services + CA on real nats-server,
SoftHSM and swtpm).
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, load_der_public_key
from cryptography.x509.oid import NameOID

from mgmt.natsserver import free_port
from tests.conftest import SLOWDOWN
from tests.deploy.engine import ROOT, Engine, EngineUnavailable, build_images, engine

pytestmark = [pytest.mark.docker, pytest.mark.timeout(2400)]

# The uid the edgekms image runs as (docker/Dockerfile).
IMAGE_UID = 10001
# What an engine grants a container by default (Docker's and podman's lists).
DEFAULT_CAPS = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "NET_RAW", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
# One exec per container: its pid 1's capabilities and uid, then a write to the root fs.
PROBE = "cat /proc/1/status; touch /usr/probe 2>&1; echo touch-rc=$?"
SOCKETS = "/var/lib/edgekms/swtpm/swtpm.sock /var/lib/edgekms/swtpm/swtpm.sock.ctrl"
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
LONG_RUNNING = sorted(n for n, s in COMPOSE["services"].items() if s.get("restart") != "no")


class Stack:
    """One compose project on `engine`, with its own name, ports and client directory."""

    def __init__(self, found: Engine, client_dir: Path) -> None:
        self.engine = found
        self.project = f"edgekms-test-{uuid.uuid4().hex[:8]}"
        self.broker_port = free_port()
        self.ca_port = free_port()
        self.client_dir = client_dir
        self.env = {
            **found.env,
            "EDGEKMS_CLIENT_DIR": str(client_dir),
            "EDGEKMS_BROKER_PORT": str(self.broker_port),
            "EDGEKMS_CA_PORT": str(self.ca_port),
        }

    def run(
        self, *args: str, timeout: float = 300.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """`compose -p PROJECT ARGS` with this stack's ports and client directory."""
        argv = [*self.engine.compose, "-p", self.project, "-f", "compose.yaml", *args]
        found = Engine(self.engine.kind, self.env, self.engine.compose)
        return found.run(argv, timeout * SLOWDOWN, check=check)

    def compose(self, *args: str, timeout: float = 300.0, check: bool = True) -> str:
        return self.run(*args, timeout=timeout, check=check).stdout

    def up(self) -> None:
        self.compose("up", "-d", "--no-build", timeout=600.0)

    def healthy(self, service: str) -> bool:
        test = COMPOSE["services"][service]["healthcheck"]["test"]
        assert test[0] == "CMD", service
        return bool(
            self.run("exec", "-T", service, *test[1:], timeout=60.0, check=False).returncode == 0
        )

    def wait_healthy(self, timeout: float) -> None:
        """The harness runs the healthchecks (no engine scheduler needed), until all pass."""
        deadline = time.monotonic() + timeout * SLOWDOWN
        pending = list(LONG_RUNNING)
        while pending:
            pending = [s for s in pending if not self.healthy(s)]
            if pending and time.monotonic() > deadline:
                logs = self.compose("logs", "--no-color", "--tail", "40", check=False)
                raise AssertionError(f"not healthy after {timeout}s: {pending}\n{logs[-6000:]}")
            if pending:
                time.sleep(1.0)

    def inspect(self) -> list[dict[str, Any]]:
        ids = self.compose("ps", "-q").split()
        from importlib import import_module

        # importlib: mypy would take the repository's docker/ folder for the SDK.
        sdk = import_module("docker")
        client = sdk.DockerClient(base_url=self.env.get("DOCKER_HOST"), timeout=60)
        try:
            return [dict(client.api.inspect_container(i)) for i in ids]
        finally:
            client.close()

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "-t", "5", check=False)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    try:
        with engine() as found:
            build_images(found)
            client_dir = tmp_path_factory.mktemp("edgekms-client")
            # The init role runs as the image's uid (10001) and exports the client config
            # here; a bind-mounted directory keeps the host's owner.
            if os.geteuid() == 0:
                os.chown(client_dir, IMAGE_UID, IMAGE_UID)
                client_dir.chmod(0o700)
            else:  # a Docker user who is not root: pytest's base temp dir is 0700 already
                client_dir.chmod(0o777)
            running = Stack(found, client_dir)
            try:
                running.up()
                running.wait_healthy(300.0)
                yield running
            finally:
                running.down()
    except EngineUnavailable as exc:
        pytest.skip(f"compose end-to-end test needs a container engine: {exc}")


def client_config(client_dir: Path) -> Path:
    configs = sorted(client_dir.glob("*.toml"))
    assert configs, f"kmsctl init exported no client config into {client_dir}"
    return configs[0]


def test_sign_through_the_stack(stack: Stack) -> None:
    from mgmt.client import KMSClient

    client = KMSClient.from_config(client_config(stack.client_dir))
    # Both providers: SoftHSM in crypto-hsm, and swtpm (over its socket) in crypto-tpm.
    for provider in ("hsm0", "tpm0"):
        name = f"compose/e2e-{provider}"
        client.create_key(name, "ec-p256", provider=provider)
        data = f"signed inside the compose stack by {provider}".encode()
        signature = client.sign(name, data)
        public = client.get_public_key(name)
        verifier = load_der_public_key(public.der)
        assert isinstance(verifier, ec.EllipticCurvePublicKey)
        verifier.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        assert client.verify(name, data, signature)


def test_issue_a_certificate_through_the_stack(stack: Stack) -> None:
    from mgmt.client import KMSClient

    client = KMSClient.from_config(client_config(stack.client_dir))
    # The CA's bus identity may sign only through hsm0 (EDGEKMS_CA_PROVIDER's default).
    init = client.ca_init("EdgeKMS compose test CA", "ec-p256", provider="hsm0")
    assert init.root_certificate_der and init.intermediate_certificate_der
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nas.example.test")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("nas.example.test")]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    response = client.issue_certificate("https-server", csr.public_bytes(Encoding.DER))
    certificate = x509.load_der_x509_certificate(response.certificate_der)
    assert certificate.public_key() == key.public_key()
    issuer = x509.load_der_x509_certificate(response.chain_der[0])
    certificate.verify_directly_issued_by(issuer)
    assert issuer.public_bytes(Encoding.DER) == init.intermediate_certificate_der
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert sans.value.get_values_for_type(x509.DNSName) == ["nas.example.test"]


def test_every_container_is_read_only_unprivileged_and_not_root(stack: Stack) -> None:
    containers = stack.inspect()
    by_service = {c["Config"]["Labels"]["com.docker.compose.service"]: c for c in containers}
    assert set(by_service) == set(COMPOSE["services"]), sorted(by_service)
    for name, c in by_service.items():
        host = c["HostConfig"]
        assert host["ReadonlyRootfs"] is True, name
        assert not host.get("Privileged"), name
        # Docker keeps "ALL"; podman lists what it dropped: every default capability.
        dropped = {cap.upper().removeprefix("CAP_") for cap in host.get("CapDrop") or []}
        assert dropped == {"ALL"} or dropped >= DEFAULT_CAPS, (name, sorted(dropped))
        assert not host.get("CapAdd"), name
        assert any("no-new-privileges" in o for o in host.get("SecurityOpt") or []), name
        user = c["Config"]["User"]
        assert user and user.split(":")[0] not in ("0", "root"), (name, user)
        if name not in LONG_RUNNING:
            continue  # a one-shot has exited: the engine's view above is all there is
        # The process's own view too (one exec, they are slow): no capability at all,
        # not uid 0, and a root filesystem that refuses a write.
        out = stack.compose("exec", "-T", name, "sh", "-c", PROBE)
        fields = dict(line.split(":\t", 1) for line in out.splitlines() if ":\t" in line)
        for kind in ("CapEff", "CapPrm", "CapBnd"):
            assert int(fields[kind].strip(), 16) == 0, (name, kind, fields[kind])
        assert fields["Uid"].split()[0] != "0", (name, fields["Uid"])
        assert "touch-rc=0" not in out and "Read-only file system" in out, (name, out[-500:])


def test_swtpm_is_reached_on_a_private_socket_and_provisioned(stack: Stack) -> None:
    # Sockets 0600, owned by the uid both containers run as; nothing listens on TCP.
    sockets = stack.compose("exec", "-T", "swtpm", "sh", "-c", "stat -c '%a %u %F' " + SOCKETS)
    assert sockets.split("\n")[:2] == [f"600 {IMAGE_UID} socket"] * 2, sockets
    tcp = stack.compose(
        "exec", "-T", "swtpm", "sh", "-c", "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null; true"
    )
    listening = [line for line in tcp.splitlines() if line.split()[3:4] == ["0A"]]
    assert not listening, tcp
    # crypto-tpm provisioned it before it started: the three auth values are in its own
    # volume, 0600 (kmsctl tpm provision, as `kmsctl up --tpm swtpm` does).
    secrets = "/var/lib/edgekms/tpm0/secrets"
    out = stack.compose("exec", "-T", "crypto-tpm", "sh", "-c", f"stat -c '%n %a %s' {secrets}/*")
    files = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    expected = {f"{secrets}/tpm-{h}.auth" for h in ("owner", "endorsement", "lockout")}
    assert set(files) == expected, out
    for path, (mode, size) in files.items():
        assert mode == "600" and int(size) > 0, (path, mode, size)
