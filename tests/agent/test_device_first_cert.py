"""An enrolled device's agent gets the first certificate of a `[[cert]]` itself, with
the device's own identity, against the real stack (tests/agent/conftest.py's `kmsctl
up`): for the names its enrollment token carried it is issued, its files written, and
the CA records the device as requester; for a name outside the token the broker refuses
(`device.name_not_allowed`), the agent says so in its log and state and exits 7, and no
file and no certificate for that name appear."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from edgekms.v1 import ca_pb2
from tests.agent.conftest import AgentStack
from tests.conftest import SLOWDOWN
from tests.e2e.conftest import BIN
from tests.enroll.test_enroll import enrolled

NAS = "nas-agent.home.arpa"
OUTSIDE = "bank.example"


def cert_item(name: str, host: str, files: Path) -> str:
    return (
        "[[cert]]\n"
        f'name = "{name}"\nprofile = "https-server"\ncommon_name = "{host}"\n'
        f'sans = ["dns:{host}"]\nttl = "1d"\n'
        f'cert = "{files / (name + ".crt")}"\nkey = "{files / (name + ".key")}"\n'
        f'chain = "{files / (name + "-chain.pem")}"\n'
    )


@pytest.mark.timeout(600)
def test_an_enrolled_device_gets_its_first_certificate_itself(
    agent_stack: AgentStack, tmp_path: Path
) -> None:
    stack = agent_stack.stack
    device_config = enrolled(stack, tmp_path, "nas-agent", "--san", f"dns:{NAS}")
    files = tmp_path / "etc"
    files.mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'client_config = "{device_config}"\n'
        f'state_file = "{tmp_path / "state.json"}"\n'
        + cert_item("web", NAS, files)
        + cert_item("bank", OUTSIDE, files)
    )
    once = subprocess.run(
        [str(BIN / "kmsctl"), "agent", "--config", str(config), "--once"],
        capture_output=True, text=True, check=False, timeout=180 * SLOWDOWN,
    )  # fmt: skip
    # The first failure's code: 7, not allowed (PERMISSION_DENIED).
    assert once.returncode == 7, once.stdout + once.stderr

    # Its own name: issued to the device, the files in place.
    leaf = x509.load_pem_x509_certificates((files / "web.crt").read_bytes())[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [NAS]
    assert (files / "web.key").exists() and (files / "web-chain.pem").exists()
    with stack.client() as admin:
        listed = admin.list_certificates_page(ca_pb2.ListCertificatesRequest(requester="nas-agent"))
    assert [(int(r.serial, 16), r.requester, r.profile) for r in listed.records] == [
        (leaf.serial_number, "nas-agent", "https-server")
    ]

    # A name the token did not carry: refused, said in the log and the state, no file.
    assert not (files / "bank.crt").exists()
    logged = [json.loads(line) for line in once.stderr.splitlines() if line.startswith("{")]
    assert any(
        e.get("event") == "agent_retry"
        and e.get("item") == "bank"
        and e.get("reason") == "device.name_not_allowed"
        for e in logged
    ), once.stderr
    status = subprocess.run(
        [str(BIN / "kmsctl"), "agent", "status", "--config", str(config), "-o", "json"],
        capture_output=True, text=True, check=False, timeout=60 * SLOWDOWN,
    )  # fmt: skip
    assert status.returncode == 1, status.stdout + status.stderr
    items = {i["name"]: i for i in json.loads(status.stdout)["items"]}
    assert items["web"]["state"] == "ok" and items["web"]["serial"]
    assert items["bank"]["state"] == "failing"
    assert items["bank"]["last_error"]["reason"] == "device.name_not_allowed"
