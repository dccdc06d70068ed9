"""The stack under test, started exactly as a user starts it: `kmsctl up` in a subprocess
(nats-server, SoftHSM token, kms-crypto hsm0 and tpm0 on swtpm, ceremony, kms-broker),
timed from spawn until <data-dir>/run/state.json says ready.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.load import LoadSpec
from bench.procs import children
from mgmt.natsserver import free_port

BIN = Path(sys.executable).parent


@dataclass
class RunningStack:
    data_dir: Path
    broker: str
    nats_url: str
    process: subprocess.Popen[bytes]
    ready_seconds: float
    log_path: Path

    @property
    def client_config(self) -> Path:
        return self.data_dir / "client" / "config.toml"

    def pids(self) -> dict[str, int]:
        """Every process of the stack by role: kmsctl-up, nats-server, swtpm, crypto-*, broker."""
        state = json.loads((self.data_dir / "run" / "state.json").read_text())
        named = {str(k): int(v) for k, v in state["children"].items()}
        found = {"kmsctl-up": self.process.pid}
        for pid, comm in children(self.process.pid).items():
            if pid in named.values():
                continue
            if comm.startswith("nats-server"):
                found["nats-server"] = pid
            elif comm.startswith("swtpm"):
                found["swtpm"] = pid
        return {**found, **named}

    def sign_spec(
        self,
        key_name: str,
        key_type: str,
        inflight: int,
        duration: float,
        warmup: float,
        data: bytes | None = None,
    ) -> LoadSpec:
        """A Sign load on an existing key, as the stack's admin client (mutual TLS with its
        client certificate), with the key's default algorithm; the key's public key rides
        along, so every sample answer must verify (bench.load.check_samples)."""
        from edgekms.algorithms import KEY_TYPE_BY_CLI, key_type_info
        from mgmt.client import KMSClient
        from mgmt.clientconfig import load_client_config

        config = load_client_config(self.client_config)
        ca_cert, cert, key = config.read_credentials()
        with KMSClient.from_config(self.client_config, timeout=60) as client:
            public_key_der = client.get_public_key(key_name).der
        return LoadSpec(
            target=self.broker,
            server_name=config.server_name or "edgekms-broker",
            ca_cert=ca_cert,
            cert=cert,
            key=key,
            key_name=key_name,
            algorithm=key_type_info(KEY_TYPE_BY_CLI[key_type].key_type).default_algorithm,
            data=secrets.token_bytes(32) if data is None else data,
            inflight=inflight,
            duration=duration,
            warmup=warmup,
            public_key_der=public_key_der,
        )

    def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def bus_options(data_dir: Path, user: str = "broker") -> dict[str, Any]:
    """nats.connect options for one of the stack's bus identities.

    When the stack runs with bus auth and TLS (mgmt.natsauth), the bench speaks to the CA
    service as the broker does, with the broker's identity; on an open bus, nothing."""
    tls_ca = data_dir / "nats" / "tls" / "bus-ca.crt"
    if not tls_ca.exists():
        return {}
    from mgmt.natsauth import BusCredentials, password_path

    creds = BusCredentials(user, password_path(data_dir / "secrets", user), tls_ca)
    return creds.connect_options()


def start(
    data_dir: Path, timeout: float = 120.0, log_level: str = "warning", extra: tuple[str, ...] = ()
) -> RunningStack:
    nats_port, broker_port, ca_port = free_port(), free_port(), free_port()
    log_path = data_dir.parent / f"{data_dir.name}-up.log"
    argv = [
        str(BIN / "kmsctl"),
        "up",
        "--data-dir",
        str(data_dir),
        "--nats-port",
        str(nats_port),
        "--broker-listen",
        f"127.0.0.1:{broker_port}",
        # Its own free port: the default (the broker's + 1) may be another stack's.
        "--enroll-listen",
        f"127.0.0.1:{free_port()}",
        "--tpm",
        "swtpm",
        "--ca-http",
        f"127.0.0.1:{ca_port}",
        "--log-level",
        log_level,
        # Each service's readiness wait: as long as the whole start may take (qemu-user).
        "--start-timeout",
        str(timeout),
        # bench/startup.py reads kmsctl up's own lines for its timeline: JSON, not text.
        "--log-format",
        "json",
        # Metrics on free ports: a bench stack must not fight a running one for 9464..
        "--metrics-listen",
        "127.0.0.1:0",
        *extra,
    ]
    state_file = data_dir / "run" / "state.json"
    with open(log_path, "ab") as log_file:
        t0 = time.perf_counter()
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = t0 + timeout
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"kmsctl up exited {process.returncode}: {log_path.read_text()[-2000:]}"
            )
        try:
            ready = json.loads(state_file.read_text() or "{}").get("ready")
        except (OSError, ValueError):
            ready = False
        if ready:
            return RunningStack(
                data_dir,
                f"127.0.0.1:{broker_port}",
                str(json.loads(state_file.read_text()).get("nats_url", "")),
                process,
                time.perf_counter() - t0,
                log_path,
            )
        time.sleep(0.01)
    process.kill()
    raise RuntimeError(f"kmsctl up not ready in {timeout:.0f}s: {log_path.read_text()[-2000:]}")
