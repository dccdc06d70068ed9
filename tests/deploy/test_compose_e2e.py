"""The compose stack end to end through testcontainers: build, `docker compose up`,
then, as kmsctl on the host would, sign with a key in SoftHSM and have the CA issue a
certificate, both through the broker's published port.

It needs a Docker engine with the compose plugin and skips, saying why, where there is
none. Everything it proves is also proven without Docker by the process-based tests
(tests/e2e: broker + crypto services + CA on real nats-server, SoftHSM and swtpm).
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, load_der_public_key
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]


def docker_unavailable() -> str | None:
    """Why the stack cannot run here, or None when it can."""
    if shutil.which("docker") is None:
        return "no docker CLI on PATH"
    try:
        # importlib: mypy would take the repository's docker/ folder for the SDK.
        sdk = importlib.import_module("docker")
        sdk.from_env(timeout=5).ping()
    except Exception as exc:
        return f"no Docker engine answers ({type(exc).__name__})"
    probe = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, text=True, timeout=20, check=False
    )
    if probe.returncode != 0:
        return "the docker CLI has no compose plugin"
    return None


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    reason = docker_unavailable()
    if reason is not None:
        pytest.skip(f"compose end-to-end test needs Docker: {reason}")
    from testcontainers.compose import DockerCompose

    client_dir = tmp_path_factory.mktemp("edgekms-client")
    env_file = tmp_path_factory.mktemp("env") / "compose.env"
    env_file.write_text(f"EDGEKMS_CLIENT_DIR={client_dir}\n")
    compose = DockerCompose(
        ROOT, compose_file_name="compose.yaml", build=True, wait=True, env_file=str(env_file)
    )
    with compose:
        yield client_dir


def client_config(client_dir: Path) -> Path:
    configs = sorted(client_dir.glob("*.toml"))
    assert configs, f"kmsctl init exported no client config into {client_dir}"
    return configs[0]


def test_sign_through_the_stack(stack: Path) -> None:
    from mgmt.client import KMSClient

    client = KMSClient.from_config(client_config(stack))
    client.create_key("compose/e2e", "ec-p256", provider="hsm0")
    data = b"signed inside the compose stack"
    signature = client.sign("compose/e2e", data)
    public = client.get_public_key("compose/e2e")
    verifier = load_der_public_key(public.der)
    assert isinstance(verifier, ec.EllipticCurvePublicKey)
    verifier.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    assert client.verify("compose/e2e", data, signature)


def test_issue_a_certificate_through_the_stack(stack: Path) -> None:
    from mgmt.client import KMSClient

    client = KMSClient.from_config(client_config(stack))
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
