"""The agent against the real stack (tests/agent/conftest.py): it gets, renews and
installs certificates, runs the reload command after each change, keeps an OpenVPN
crl-verify file good past the first CRL's end, rides out a KMS that is away, and keeps
correct files while a reload command fails. Every wait polls a condition with a
generous deadline."""

from __future__ import annotations

import calendar
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edgekms.v1 import ca_pb2
from mgmt import bundle, ovpn
from mgmt.clientconfig import load_client_config
from mgmt.natsserver import free_port
from mgmt.pki import write_private
from tests.agent.conftest import AgentProcess, AgentStack, Forwarder
from tests.ca.test_bundles import LISTENING, openvpn, poll_log
from tests.conftest import SLOWDOWN
from tests.e2e.conftest import BIN

needs_openvpn = pytest.mark.skipif(shutil.which("openvpn") is None, reason="needs openvpn")

# The reload command the tests configure: records, for each run, the item and what its
# files hold at that moment (so a record proves the command ran after the files were in
# place), and fails while a "fail" file exists beside it.
RELOAD_SCRIPT = """
import json, os, sys, time
from pathlib import Path
from cryptography import x509
here = Path(sys.argv[0]).parent
entry = {"item": os.environ["EDGEKMS_AGENT_ITEM"], "at": time.time()}
if "EDGEKMS_AGENT_CERT" in os.environ:
    cert = x509.load_pem_x509_certificates(Path(os.environ["EDGEKMS_AGENT_CERT"]).read_bytes())[0]
    entry["serial"] = format(cert.serial_number, "X")
if "EDGEKMS_AGENT_CLIENT_CONFIG" in os.environ:
    import tomllib
    conf = Path(os.environ["EDGEKMS_AGENT_CLIENT_CONFIG"])
    crt = conf.parent / tomllib.loads(conf.read_text())["cert"]
    held = x509.load_pem_x509_certificates(crt.read_bytes())[0]
    entry["serial"] = format(held.serial_number, "X")
if "EDGEKMS_AGENT_CRL" in os.environ:
    data = Path(os.environ["EDGEKMS_AGENT_CRL"]).read_bytes()
    entry["crls"] = data.count(b"BEGIN X509 CRL")
if (here / "fail").exists():
    with open(here / "failed.jsonl", "a") as fh:
        fh.write(json.dumps(entry) + "\\n")
    print("reload refused: the service is not ready")
    sys.exit(1)
with open(here / "reloads.jsonl", "a") as fh:
    fh.write(json.dumps(entry) + "\\n")
"""


def reload_command(directory: Path) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "reload.py"
    script.write_text(RELOAD_SCRIPT)
    return [sys.executable, str(script)]


def records(directory: Path, name: str = "reloads.jsonl") -> list[dict[str, object]]:
    path = directory / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def leaf(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def serial_of(path: Path) -> str:
    return f"{leaf(path).serial_number:X}"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def openssl_verify(chain: Path, cert: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", "-CAfile", str(chain), str(cert)],
        capture_output=True,
        text=True,
        check=False,
    )


# ---- renewal, reload, CRL file, OpenVPN -------------------------------------------------


@needs_openvpn
@pytest.mark.timeout(900)
def test_renews_twice_reloads_each_time_and_keeps_crl_verify_good(
    agent_stack: AgentStack, tmp_path: Path, run_agent: Callable[..., AgentProcess]
) -> None:
    """A 5-minute vpn-server certificate renewed at a quarter of its lifetime: issued,
    then renewed twice, the reload command run after each with the new certificate
    already in the file, the key kept (renewal by serial) and 0600. The CA's CRLs live
    one minute; after the first CRL file's nextUpdate has passed, a real OpenVPN server
    with `crl-verify` on the agent's file and the agent's certificate accepts a client,
    while the same server with the first file turns the client away."""
    files = tmp_path / "etc"
    files.mkdir()
    hooks = tmp_path / "hooks"
    command = reload_command(hooks)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'client_config = "{agent_stack.operator_config}"\n'
        f'state_file = "{tmp_path / "state.json"}"\n'
        "renew_at = 0.25\n"
        "min_interval_seconds = 2\n"
        "crl_max_interval_seconds = 20\n"
        "retry_initial_seconds = 1\n"
        "retry_max_seconds = 5\n"
        "[[cert]]\n"
        'name = "vpn"\nprofile = "vpn-server"\ncommon_name = "vpn.home.arpa"\n'
        'sans = ["dns:vpn.home.arpa"]\nttl = "5m"\n'
        f'cert = "{files / "server.crt"}"\nkey = "{files / "server.key"}"\n'
        f'chain = "{files / "chain.pem"}"\nexec = {toml_list(command)}\n'
        "[[crl]]\n"
        f'name = "openvpn-crl"\npath = "{files / "crl.pem"}"\nexec = {toml_list(command)}\n'
    )
    agent = run_agent(config, tmp_path / "agent.log")

    def cert_reloads() -> list[dict[str, object]]:
        return [r for r in records(hooks) if r["item"] == "vpn"]

    first = agent.wait_for("the first certificate", lambda: cert_reloads())[0]
    first_key = (files / "server.key").read_bytes()
    assert mode_of(files / "server.key") == 0o600
    assert mode_of(files / "server.crt") == 0o644
    crl_first = agent.wait_for(
        "the first CRL file", lambda: [r for r in records(hooks) if r["item"] == "openvpn-crl"]
    )
    first_crl_bytes = (files / "crl.pem").read_bytes()
    first_crl = x509.load_pem_x509_crl(first_crl_bytes)
    assert crl_first[0]["crls"] == 1

    # Issued, then renewed twice: three distinct serials, each reload saw its own.
    reloads = agent.wait_for(
        "two renewals", lambda: cert_reloads() if len(cert_reloads()) >= 3 else None, 420
    )
    serials = [r["serial"] for r in reloads[:3]]
    assert len(set(serials)) == 3 and serials[0] == first["serial"]
    renewed = agent.events("agent_cert_renewed")
    assert [e["serial"] for e in renewed[:2]] == serials[1:3]
    assert (files / "server.key").read_bytes() == first_key  # renewal keeps the key
    assert mode_of(files / "server.key") == 0o600
    done = openssl_verify(files / "chain.pem", files / "server.crt")
    assert done.returncode == 0, done.stdout + done.stderr
    with agent_stack.stack.client() as kms:
        old = kms.get_certificate(str(serials[0]))
        assert old.superseded_by == serials[1]

    # The CRL file outlives the first CRL: wait until that one has expired.
    first_end = first_crl.next_update_utc.timestamp()  # type: ignore[union-attr]

    def fresh_crl_after_first_end() -> bool:
        if time.time() < first_end + 2:
            return False
        crl = x509.load_pem_x509_crl((files / "crl.pem").read_bytes())
        end = crl.next_update_utc
        return end is not None and end.timestamp() > time.time() + 5

    agent.wait_for("a CRL file fresher than the first", fresh_crl_after_first_end, 300)
    stale = tmp_path / "first-crl.pem"
    stale.write_bytes(first_crl_bytes)
    _openvpn_with_crl(agent_stack, tmp_path, files, files / "crl.pem", stale)

    state = json.loads((tmp_path / "state.json").read_text())
    assert state["items"]["vpn"]["failures"] == 0
    status = subprocess.run(
        [str(BIN / "kmsctl"), "agent", "status", "--config", str(config), "-o", "json"],
        capture_output=True, text=True, check=False, timeout=60 * SLOWDOWN,
    )  # fmt: skip
    assert status.returncode == 0, status.stdout + status.stderr
    items = {i["name"]: i for i in json.loads(status.stdout)["items"]}
    assert items["vpn"]["state"] == "ok" and items["vpn"]["next_due"]
    assert items["openvpn-crl"]["next_update"]
    assert agent.stop() == 0
    assert agent.events("agent_stopped")


def _openvpn_with_crl(
    agent_stack: AgentStack, tmp_path: Path, files: Path, crl_file: Path, stale: Path
) -> None:
    """OpenVPN server with the agent's certificate and CRL file; a client from the CA."""
    client_key = bundle.generate_key("ec-p256")
    with agent_stack.stack.client() as kms:
        issued = kms.issue_certificate(
            "vpn-client", bundle.make_csr(client_key, "laptop", []), validity_seconds=3600
        )
    chain = list(issued.chain_der)
    (tmp_path / "vpn-chain.pem").write_bytes(bundle.pem_bundle(chain[0], chain[1:]))
    # A copy of the server's files as they are now: the agent may renew meanwhile.
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    shutil.copy(files / "server.crt", server_dir / "server.crt")
    write_private(server_dir / "server.key", (files / "server.key").read_bytes())
    port = free_port()
    profile = tmp_path / "laptop.ovpn"
    write_private(
        profile,
        ovpn.client_profile(
            ovpn.Remote("127.0.0.1", port),
            issued.certificate_der,
            chain,
            bundle.key_pem(client_key),
            None,
            "vpn.home.arpa",
        ),
    )

    def server_argv(crl: Path) -> list[str]:
        return [
            "--tls-server", "--proto", "udp", "--local", "127.0.0.1", "--lport", str(port),
            "--ca", str(tmp_path / "vpn-chain.pem"), "--cert", str(server_dir / "server.crt"),
            "--key", str(server_dir / "server.key"), "--dh", "none",
            "--crl-verify", str(crl), "--remote-cert-tls", "client", "--verb", "3",
        ]  # fmt: skip

    crl_copy = tmp_path / "crl-now.pem"
    shutil.copy(crl_file, crl_copy)  # what the agent wrote, frozen for this server run
    log = tmp_path / "server-fresh.log"
    with openvpn(log, *server_argv(crl_copy)) as server:
        poll_log(log, LISTENING, server, 90 * SLOWDOWN)
        with openvpn(tmp_path / "client-fresh.log", "--config", str(profile)) as client:
            poll_log(
                tmp_path / "client-fresh.log", "Initialization Sequence Completed", client,
                120 * SLOWDOWN,
            )  # fmt: skip
        assert "CRL has expired" not in log.read_text()
    log = tmp_path / "server-stale.log"
    with openvpn(log, *server_argv(stale)) as server:
        poll_log(log, LISTENING, server, 90 * SLOWDOWN)
        with openvpn(tmp_path / "client-stale.log", "--config", str(profile)):
            text = poll_log(log, "CRL has expired", server, 120 * SLOWDOWN)
        assert "Peer Connection Initiated" not in text


# ---- the KMS away -----------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_kms_away_backs_off_then_recovers(
    agent_stack: AgentStack, tmp_path: Path, run_agent: Callable[..., AgentProcess]
) -> None:
    """The device reaches the broker through a relay that is closed: `--once` exits 8,
    the running agent retries with growing delays (each in [step/2, step], the step
    doubling), writes nothing, and says so in its state; once the relay opens it gets its
    certificate and the state says ok."""
    broker_host, _, broker_port = agent_stack.stack.broker.rpartition(":")
    relay_port = free_port()
    device = tmp_path / "device"
    shutil.copytree(agent_stack.operator_dir, device)
    text = (device / "config.toml").read_text()
    (device / "config.toml").write_text(
        text.replace(agent_stack.stack.broker, f"127.0.0.1:{relay_port}")
    )
    assert load_client_config(device / "config.toml").broker == f"127.0.0.1:{relay_port}"
    files = tmp_path / "etc"
    files.mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'client_config = "{device / "config.toml"}"\n'
        f'state_file = "{tmp_path / "state.json"}"\n'
        "retry_initial_seconds = 1\nretry_max_seconds = 8\n"
        "[[cert]]\n"
        'name = "web"\nprofile = "https-server"\ncommon_name = "nas.home.arpa"\n'
        'sans = ["dns:nas.home.arpa", "ip:192.168.1.10"]\nfullchain = true\n'
        f'cert = "{files / "nas.crt"}"\nkey = "{files / "nas.key"}"\n'
    )
    once = subprocess.run(
        [str(BIN / "kmsctl"), "agent", "--config", str(config), "--once"],
        capture_output=True, text=True, check=False, timeout=120 * SLOWDOWN,
    )  # fmt: skip
    assert once.returncode == 8, once.stdout + once.stderr
    assert not (files / "nas.crt").exists()
    status = subprocess.run(
        [str(BIN / "kmsctl"), "agent", "status", "--config", str(config), "-o", "json"],
        capture_output=True, text=True, check=False, timeout=60 * SLOWDOWN,
    )  # fmt: skip
    assert status.returncode == 1, status.stdout
    web = json.loads(status.stdout)["items"][0]
    assert web["state"] == "failing" and web["last_error"]["reason"]

    agent = run_agent(config, tmp_path / "agent.log")
    retries = agent.wait_for(
        "three retries",
        lambda: agent.events("agent_retry") if len(agent.events("agent_retry")) >= 3 else None,
        180,
    )
    # The failures count on from the --once run (the state file): each wait lies in
    # [step/2, step] for step = 1 s * 2^(failures-1), capped at 8 s, so they grow.
    delays = []
    for event in retries[:3]:
        step = min(8.0, 2.0 ** (int(event["failures"]) - 1))
        delay = float(event["retry_in"])
        assert step / 2 - 0.05 <= delay <= step + 0.05, (event, delay, step)
        delays.append(delay)
    assert [int(e["failures"]) for e in retries[:3]] == [2, 3, 4]
    assert delays[2] >= delays[0]
    assert not (files / "nas.crt").exists()

    relay = Forwarder(relay_port, (broker_host, int(broker_port)))
    relay.open()
    try:
        agent.wait_for("the certificate after recovery", lambda: agent.events("agent_cert_issued"))
        cert = leaf(files / "nas.crt")
        assert len(x509.load_pem_x509_certificates((files / "nas.crt").read_bytes())) == 3
        bundle.check_key_matches(
            bundle.load_leaf_key((files / "nas.key").read_bytes()),
            cert.public_bytes(serialization.Encoding.DER),
        )
        assert mode_of(files / "nas.key") == 0o600

        def state_ok() -> bool:
            state = json.loads((tmp_path / "state.json").read_text())
            return bool(state["items"]["web"]["failures"] == 0)

        agent.wait_for("the state saying ok", state_ok)
    finally:
        agent.stop()
        relay.close()


# ---- a reload command that fails ---------------------------------------------------------


@pytest.mark.timeout(600)
def test_failing_reload_is_logged_retried_and_files_stay_correct(
    agent_stack: AgentStack, tmp_path: Path, run_agent: Callable[..., AgentProcess]
) -> None:
    """The reload command fails: logged as agent_reload_failed, run again with backoff,
    the certificate and key in place, matching and 0600, and no second certificate is
    asked for. SIGHUP with a broken config is refused and the agent keeps going. Once the
    command succeeds, the state says ok."""
    files = tmp_path / "etc"
    files.mkdir()
    hooks = tmp_path / "hooks"
    command = reload_command(hooks)
    (hooks / "fail").write_text("")
    config = tmp_path / "agent.toml"
    good_config = (
        f'client_config = "{agent_stack.operator_config}"\n'
        f'state_file = "{tmp_path / "state.json"}"\n'
        "retry_initial_seconds = 1\nretry_max_seconds = 4\n"
        "[[cert]]\n"
        'name = "device"\nprofile = "device"\ncommon_name = "dev-1.home.arpa"\n'
        'sans = ["dns:dev-1.home.arpa"]\n'
        f'cert = "{files / "device.crt"}"\nkey = "{files / "device.key"}"\n'
        f'chain = "{files / "chain.pem"}"\nexec = {toml_list(command)}\n'
    )
    config.write_text(good_config)
    agent = run_agent(config, tmp_path / "agent.log")
    agent.wait_for(
        "two failed reloads",
        lambda: len(agent.events("agent_reload_failed")) >= 2,
    )
    failed = records(hooks, "failed.jsonl")
    assert len(failed) >= 2 and len({f["serial"] for f in failed}) == 1
    assert len(agent.events("agent_cert_issued")) == 1
    assert agent.events("agent_reload_failed")[0]["reason"] == "agent.reload_failed"
    assert serial_of(files / "device.crt") == failed[0]["serial"]
    bundle.check_key_matches(
        bundle.load_leaf_key((files / "device.key").read_bytes()),
        leaf(files / "device.crt").public_bytes(serialization.Encoding.DER),
    )
    assert mode_of(files / "device.key") == 0o600
    done = openssl_verify(files / "chain.pem", files / "device.crt")
    assert done.returncode == 0, done.stdout + done.stderr
    status = subprocess.run(
        [str(BIN / "kmsctl"), "agent", "status", "--config", str(config), "-o", "json"],
        capture_output=True, text=True, check=False, timeout=60 * SLOWDOWN,
    )  # fmt: skip
    assert status.returncode == 1
    item = json.loads(status.stdout)["items"][0]
    assert item["reload_pending"] is True and item["last_error"]["reason"] == "agent.reload_failed"

    # A broken config on SIGHUP: refused, the old one kept.
    config.write_text(good_config + 'key_mode = "0644"\n')
    agent.proc.send_signal(signal.SIGHUP)
    rejected = agent.wait_for(
        "the broken config refused", lambda: agent.events("agent_config_rejected")
    )
    assert rejected[0]["reason"] == "agent.config_invalid"
    assert "cert[0].key_mode" in rejected[0]["error"]
    config.write_text(good_config)

    os.unlink(hooks / "fail")
    ok = agent.wait_for("the reload succeeding", lambda: records(hooks))
    assert ok[0]["serial"] == failed[0]["serial"]
    agent.wait_for(
        "the state saying ok",
        lambda: (
            json.loads((tmp_path / "state.json").read_text())["items"]["device"]["reload_pending"]
            is False
        ),
    )
    assert len(agent.events("agent_cert_issued")) == 1
    assert agent.proc.poll() is None


def test_bad_config_exits_3_naming_the_key(agent_stack: AgentStack, tmp_path: Path) -> None:
    """`kmsctl agent --once` on a config with a bad key runs nothing and names it."""
    config = tmp_path / "agent.toml"
    config.write_text(
        f'client_config = "{agent_stack.operator_config}"\n'
        "[[cert]]\n"
        'name = "web"\nprofile = "https-server"\ncommon_name = "nas.home.arpa"\n'
        f'cert = "{tmp_path / "a.crt"}"\nkey = "{tmp_path / "a.key"}"\nkey_mod = "0600"\n'
    )
    done = subprocess.run(
        [str(BIN / "kmsctl"), "agent", "--config", str(config), "--once"],
        capture_output=True, text=True, check=False, timeout=60 * SLOWDOWN,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "agent.config_invalid" in done.stderr and "cert[0].key_mod" in done.stderr
    assert not (tmp_path / "a.key").exists()


# ---- the agent's own identity ------------------------------------------------------------


@pytest.mark.timeout(600)
def test_identity_renews_itself_and_the_agent_goes_on_with_it(
    agent_stack: AgentStack, tmp_path: Path, run_agent: Callable[..., AgentProcess]
) -> None:
    """A signer client (no right to issue anything) with a one-day certificate and
    renew_at so small that it is due at once: the agent renews it by itself over mutual
    TLS, twice (min_interval apart), runs the reload command after each with the new
    certificate in place, and keeps fetching its CRL file with the new identity; the
    first certificate is refused by the broker afterwards, the last one works."""
    device = tmp_path / "device"
    done = subprocess.run(
        [str(BIN / "kmsctl"), "client", "add", "dev-identity", "--role", "signer",
         "--days", "1", "--out-dir", str(device)],
        env=agent_stack.stack.env(), capture_output=True, text=True, check=False,
        timeout=60 * SLOWDOWN,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    first_pem = (device / "dev-identity.crt").read_bytes()
    first_serial = serial_of(device / "dev-identity.crt")
    hooks = tmp_path / "hooks"
    command = reload_command(hooks)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'client_config = "{device / "config.toml"}"\n'
        f'state_file = "{tmp_path / "state.json"}"\n'
        "min_interval_seconds = 3\nretry_initial_seconds = 1\nretry_max_seconds = 4\n"
        f"[identity]\nrenew_at = 0.001\nexec = {toml_list(command)}\n"
        f'[[crl]]\nname = "crl"\npath = "{tmp_path / "crl.pem"}"\n'
    )
    agent = run_agent(config, tmp_path / "agent.log")
    reloads = agent.wait_for(
        "two identity renewals",
        lambda: (
            [r for r in records(hooks) if r["item"] == "identity"]
            if len([r for r in records(hooks) if r["item"] == "identity"]) >= 2
            else None
        ),
    )
    serials = [r["serial"] for r in reloads[:2]]
    assert first_serial not in serials and len(set(serials)) == 2
    renewed = agent.events("agent_cert_renewed")
    assert [e["serial"] for e in renewed[:2]] == serials
    second_at = float(reloads[1]["at"])

    def crl_fetched_after_second_renewal() -> bool:
        return any(
            calendar.timegm(time.strptime(e["ts"][:19], "%Y-%m-%dT%H:%M:%S")) >= second_at + 1
            for e in agent.events("agent_crl_updated") + agent.events("agent_crl_checked")
        )

    agent.wait_for("a CRL fetched with the renewed identity", crl_fetched_after_second_renewal)
    assert agent.stop() == 0

    from mgmt.client import KMSClient

    with KMSClient.from_config(device / "config.toml") as kms:
        me = kms.whoami()
    assert me.client == "dev-identity"
    assert int(me.serial, 16) == int(serial_of(device / "dev-identity.crt"), 16)
    # The first certificate (same key: renewal kept it) is refused from now on.
    key = (device / "dev-identity.key").read_bytes()
    ca = (device / "ca.crt").read_bytes()
    server = load_client_config(device / "config.toml")
    with KMSClient(
        server.broker, ca_cert=ca, cert=first_pem, key=key, server_name=server.server_name
    ) as old:
        from edgekms import errors

        with pytest.raises(errors.KMSError) as caught:
            old.whoami()
        assert caught.value.reason == "auth.superseded", caught.value


def test_a_revoked_certificate_is_replaced_with_a_new_key(
    agent_stack: AgentStack, tmp_path: Path
) -> None:
    """`--once` passes (cron): the first issues; an operator revokes the certificate (a
    key that may have leaked); the next pass, refused renewal (`cert.revoked`), makes a
    new key and gets a new certificate for it; the revoked serial is gone from the files."""
    files = tmp_path / "etc"
    files.mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'client_config = "{agent_stack.operator_config}"\n'
        f'state_file = "{tmp_path / "state.json"}"\n'
        "min_interval_seconds = 1\nrenew_at = 0.001\n"
        "[[cert]]\n"
        'name = "web"\nprofile = "https-server"\ncommon_name = "nas.home.arpa"\n'
        'sans = ["dns:nas.home.arpa"]\nttl = "5m"\n'
        f'cert = "{files / "nas.crt"}"\nkey = "{files / "nas.key"}"\n'
    )

    def once() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "kmsctl"), "agent", "--config", str(config), "--once"],
            capture_output=True, text=True, check=False, timeout=120 * SLOWDOWN,
        )  # fmt: skip

    first = once()
    assert first.returncode == 0, first.stderr
    assert '"event": "agent_cert_issued"' in first.stderr
    first_serial, first_key = serial_of(files / "nas.crt"), (files / "nas.key").read_bytes()
    with agent_stack.stack.client() as kms:
        kms.revoke_certificate(first_serial, ca_pb2.REVOCATION_REASON_KEY_COMPROMISE)
    state = json.loads((tmp_path / "state.json").read_text())
    due = calendar.timegm(time.strptime(state["items"]["web"]["next_due"], "%Y-%m-%dT%H:%M:%SZ"))
    deadline = time.monotonic() + 30 * SLOWDOWN
    while time.time() < due + 1 and time.monotonic() < deadline:
        time.sleep(0.2)  # --once does only what is due: let min_interval pass
    second = once()
    assert second.returncode == 0, second.stderr
    assert '"event": "agent_cert_reissued"' in second.stderr
    assert serial_of(files / "nas.crt") != first_serial
    assert (files / "nas.key").read_bytes() != first_key
    bundle.check_key_matches(
        bundle.load_leaf_key((files / "nas.key").read_bytes()),
        leaf(files / "nas.crt").public_bytes(serialization.Encoding.DER),
    )
    with agent_stack.stack.client() as kms:
        record = kms.get_certificate(serial_of(files / "nas.crt"))
        assert record.status == ca_pb2.CERTIFICATE_STATUS_VALID


def test_rekey_renews_with_a_new_key_each_time(agent_stack: AgentStack, tmp_path: Path) -> None:
    """`rekey = true`: each renewal (here every `--once` pass, the renewal point being at
    once) makes a new key on the device, the old key signing for it; the certificate
    matches the new key, the old one is superseded."""
    files = tmp_path / "etc"
    files.mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'client_config = "{agent_stack.operator_config}"\n'
        f'state_file = "{tmp_path / "state.json"}"\n'
        "min_interval_seconds = 1\nrenew_at = 0.001\n"
        "[[cert]]\n"
        'name = "vpn"\nprofile = "vpn-server"\ncommon_name = "vpn2.home.arpa"\n'
        'sans = ["dns:vpn2.home.arpa"]\nttl = "5m"\nrekey = true\n'
        f'cert = "{files / "vpn.crt"}"\nkey = "{files / "vpn.key"}"\n'
    )
    argv = [str(BIN / "kmsctl"), "agent", "--config", str(config), "--once"]
    first = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    assert first.returncode == 0, first.stderr
    first_serial, first_key = serial_of(files / "vpn.crt"), (files / "vpn.key").read_bytes()
    state = json.loads((tmp_path / "state.json").read_text())
    due = calendar.timegm(time.strptime(state["items"]["vpn"]["next_due"], "%Y-%m-%dT%H:%M:%SZ"))
    deadline = time.monotonic() + 30 * SLOWDOWN
    while time.time() < due + 1 and time.monotonic() < deadline:
        time.sleep(0.2)  # --once does only what is due: let min_interval pass
    second = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    assert second.returncode == 0, second.stderr
    assert '"event": "agent_cert_rekeyed"' in second.stderr
    assert (files / "vpn.key").read_bytes() != first_key
    assert mode_of(files / "vpn.key") == 0o600
    bundle.check_key_matches(
        bundle.load_leaf_key((files / "vpn.key").read_bytes()),
        leaf(files / "vpn.crt").public_bytes(serialization.Encoding.DER),
    )
    with agent_stack.stack.client() as kms:
        assert kms.get_certificate(first_serial).superseded_by == serial_of(files / "vpn.crt")
