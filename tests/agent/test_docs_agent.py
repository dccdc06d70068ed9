"""docs/agent.md's "Running it", its three lines as written (issue 14, item 9), with the
README's agent.toml and its operator client (README.md, "Devices keep themselves fresh:
`kmsctl agent`") against the agent tests' real stack: the agent for good until its
certificate and CRL are written (SIGTERM then stops it, exit 0), one `--once` pass, and
`status`. As in test_readme_agent.py, `systemctl` on the PATH records the reload argv."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from tests.agent.conftest import AgentStack
from tests.agent.test_readme_agent import HEADING, _block
from tests.conftest import SLOWDOWN
from tests.doccommands import ROOT, block, lines, run_lines

RUNNING = "## Running it"


def test_agent_doc_running_it_runs_as_written(agent_stack: AgentStack, tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text(_block("toml"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    recorder = bin_dir / "systemctl"
    recorder.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{tmp_path / "systemctl.log"}"\n')
    recorder.chmod(0o755)
    env = {**agent_stack.stack.env(), "PATH": f"{bin_dir}:{ROOT}/.venv/bin:/usr/bin:/bin"}
    # The README's setup lines: the tls/ directory and the agent's operator client.
    readme = lines(block("README.md", HEADING).text)
    run_lines(
        [line for line in readme if line.startswith(("mkdir", "kmsctl client"))], tmp_path, env
    )

    forever, once, status = lines(block("docs/agent.md", RUNNING).text)
    assert "--once" not in forever and forever.startswith("kmsctl agent --config agent.toml")
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        agent = subprocess.Popen(
            ["bash", "-c", "exec " + forever], cwd=tmp_path, env=env, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 180 * SLOWDOWN
        while not (
            (tmp_path / "tls" / "nas.crt").exists() and (tmp_path / "tls" / "crl.pem").exists()
        ):
            assert agent.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        # The state file is written after the pass that wrote the files.
        while True:
            shown = subprocess.run(
                ["bash", "-c", status], cwd=tmp_path, env=env, capture_output=True, text=True,
                timeout=60 * SLOWDOWN,
            )  # fmt: skip
            if shown.returncode == 0:
                break
            assert time.monotonic() < deadline, shown.stdout + shown.stderr
            time.sleep(0.2)
    finally:
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(60 * SLOWDOWN)
    assert code == 0, log.read_text()[-3000:]
    events = [json.loads(x).get("event") for x in log.read_text().splitlines() if x.startswith("{")]
    assert "agent_started" in events and "agent_stopped" in events
    assert "agent_cert_issued" in events

    ran = run_lines([once, status], tmp_path, env)
    items = {i["name"]: i["state"] for i in json.loads(ran[1].out)["items"]}
    assert items == {"nginx": "ok", "openvpn-crl": "ok"}
    assert (tmp_path / "systemctl.log").read_text().startswith("reload nginx\n")
