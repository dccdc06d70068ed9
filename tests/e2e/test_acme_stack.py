"""The README's ACME section, run as written against a `kmsctl up` stack of its own:
the same acme.toml, `kmsctl up --acme`, `ca init`, curl and certbot with the root in
their trust store, `cert list`. Substituted only: free ports for 80 and 8555, a webroot
served by a real HTTP server for /var/www/html, certbot's directories under the test's
temporary directory, and the data dir."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from mgmt.natsserver import free_port
from tests.acme.conftest import wait_listening
from tests.doccommands import block
from tests.e2e.conftest import start_stack, stop_stack

README = Path(__file__).resolve().parents[2] / "README.md"
pytestmark = [pytest.mark.timeout(600)]


def acme_block() -> str:
    return block("README.md", "## ACME: certbot, lego and the NAS's own clients", 0).text


def test_readme_acme_commands_run_as_written(tmp_path: Path) -> None:
    import shutil

    if shutil.which("certbot") is None:
        pytest.skip("needs certbot (scripts/bootstrap.sh installs it)")
    block = acme_block()
    before, up_line, after = block.partition(
        next(line for line in block.splitlines() if line.startswith("kmsctl up "))
    )
    acme_port, webroot = free_port(), tmp_path / "webroot"
    webroot.mkdir()
    web_port = free_port()
    web = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(web_port)],
        cwd=webroot,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(web_port)

        def adapt(text: str) -> str:
            certbot_dirs = " ".join(
                f"--{d}-dir {tmp_path / 'certbot' / d}" for d in ("config", "work", "logs")
            )
            return (
                text.replace("http01_port = 80 ", f"http01_port = {web_port} ")
                .replace("8555", str(acme_port))
                .replace("/var/www/html", str(webroot))
                .replace("certbot certonly", f"certbot {certbot_dirs} certonly")
            )

        root = README.parent
        env_path = f"{root}/.venv/bin:/usr/bin:/bin"
        made = subprocess.run(
            ["bash", "-c", "set -euo pipefail\n" + adapt(before)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert made.returncode == 0, made.stderr
        # `kmsctl up ... &` as the README has it, its flags kept, through the fixture
        # helper that waits for readiness and stops it afterwards.
        args = shlex.split(adapt(up_line).rstrip("&").strip())
        assert args[:2] == ["kmsctl", "up"] and args[2:4] == [
            "--data-dir",
            "~/.local/share/edgekms",
        ]
        # The stack is started from the test's directory, not tmp_path: the file by path.
        extra = [str(tmp_path / a) if a == "acme.toml" else a for a in args[4:]]
        stack = start_stack(tmp_path / "data", *extra)
        try:
            result = subprocess.run(
                ["bash", "-c", "set -euo pipefail\n" + adapt(after)],
                cwd=tmp_path,
                env={**stack.env(), "PATH": env_path},
                capture_output=True,
                text=True,
                timeout=400,
                check=False,
            )
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            decoder, out = json.JSONDecoder(), result.stdout
            listed, end = decoder.raw_decode(out, out.index("["))
            assert listed and all(r["requester"].startswith("acme:") for r in listed), listed
            accounts, end = decoder.raw_decode(out, out.index("[", end))
            assert {f"acme:{a['id']}" for a in accounts} == {r["requester"] for r in listed}
            assert "*.home.arpa, *.lan" in out[end:]  # policy show, from acme.toml
            assert "hmac key:" in out[end:] and "lego on the NAS" in out[end:]
            # Operators may look but not mint keys.
            op_dir = tmp_path / "op"
            added = subprocess.run(
                ["kmsctl", "client", "add", "op", "--role", "operator", "--out-dir", str(op_dir)],
                env={**stack.env(), "PATH": env_path},
                capture_output=True,
                text=True,
                check=False,
            )
            assert added.returncode == 0, added.stderr
            as_operator = {
                **stack.env(),
                "PATH": env_path,
                "EDGEKMS_CONFIG": str(op_dir / "config.toml"),
            }
            looked = subprocess.run(
                ["kmsctl", "acme", "eab", "list", "-o", "json"],
                env=as_operator,
                capture_output=True,
                text=True,
                check=False,
            )
            assert looked.returncode == 0 and json.loads(looked.stdout)[0]["status"] == "valid"
            minted = subprocess.run(
                ["kmsctl", "acme", "eab", "create"],
                env=as_operator,
                capture_output=True,
                text=True,
                check=False,
            )
            assert minted.returncode == 7, minted.stdout + minted.stderr
            assert "authz.role_denied" in minted.stderr and "hmac" not in minted.stdout
            after_refusal = subprocess.run(
                ["kmsctl", "acme", "eab", "list", "-o", "json"],
                env=as_operator,
                capture_output=True,
                text=True,
                check=False,
            )
            assert len(json.loads(after_refusal.stdout)) == 1  # no key was made
            live = tmp_path / "certbot" / "config" / "live" / "nas.home.arpa"
            leaf = x509.load_pem_x509_certificates((live / "fullchain.pem").read_bytes())[0]
            assert f"{leaf.serial_number:X}".lstrip("0") in {
                r["serial"].lstrip("0") for r in listed
            }
        finally:
            assert stop_stack(stack) == 0, stack.log_path.read_text()[-2000:]
    finally:
        web.terminate()
        web.wait(timeout=10)
