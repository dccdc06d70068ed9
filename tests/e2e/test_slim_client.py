"""The slim client distribution (issue 14, item 8): `protos/` builds `edgekms-client`,
which installs into a fresh venv with grpcio, protobuf and cryptography only, and from
there a program signs and verifies through the real broker with KMSClient."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import KmsStack

ROOT = Path(__file__).resolve().parents[2]
UV = Path(sys.executable).parent / "uv"
SERVER_ONLY = ("nats", "pkcs11", "tpm2_pytss", "uvloop", "aiohttp", "mgmt", "broker")

PROGRAM = """
import json, sys
from edgekms.client import KMSClient
from edgekms import errors

with KMSClient.from_config(sys.argv[1]) as kms:
    kms.create_key("slim/p256", "ec-p256")
    signature = kms.sign("slim/p256", b"from the slim client")
    try:
        kms.get_key("slim/none")
        missing = ""
    except errors.NotFound as exc:
        missing = exc.reason
    print(json.dumps({
        "verified": kms.verify("slim/p256", b"from the slim client", signature),
        "whoami": kms.whoami().client,
        "missing": missing,
        "server_modules": sorted(
            {m.split(".")[0] for m in sys.modules} & set(sys.argv[2].split(","))
        ),
    }))
"""


def _install(venv: Path, source: Path) -> None:
    subprocess.run([str(UV), "venv", "-q", str(venv)], check=True)
    command = [str(UV), "pip", "install", "-q", "--python", str(venv / "bin" / "python")]
    # From uv's cache where it can; the first run on a machine fetches the three wheels.
    offline = subprocess.run([*command, "--offline", str(source)], capture_output=True, text=True)
    if offline.returncode != 0:
        online = subprocess.run([*command, str(source)], capture_output=True, text=True)
        if online.returncode != 0 and "network" in (online.stderr + offline.stderr).lower():
            pytest.skip(f"no package index and nothing cached: {online.stderr[-300:]}")
        assert online.returncode == 0, online.stderr


def test_the_slim_client_installs_alone_and_calls_the_broker(
    kms_stack: KmsStack, tmp_path: Path
) -> None:
    # A copy, so that the build leaves nothing in the repository's protos/.
    source = tmp_path / "protos"
    shutil.copytree(
        ROOT / "protos", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    venv = tmp_path / "venv"
    _install(venv, source)
    python = str(venv / "bin" / "python")
    installed = subprocess.run(
        [str(UV), "pip", "list", "--python", python, "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    names = {p["name"].lower() for p in json.loads(installed.stdout)}
    assert "edgekms-client" in names
    assert not names & {"nats-py", "python-pkcs11", "tpm2-pytss", "uvloop", "aiohttp", "click"}

    ran = subprocess.run(
        [python, "-c", PROGRAM, str(kms_stack.client_config), ",".join(SERVER_ONLY)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout)
    assert result == {
        "verified": True,
        "whoami": "admin",
        "missing": "key.not_found",
        "server_modules": [],
    }
