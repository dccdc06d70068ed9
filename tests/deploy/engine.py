"""The container engine the compose tests run against, and the compose stack on it.

Two engines, one code path: the tests speak the Docker API (the compose CLI and `exec`
through it) and never care which engine answers.

- Docker: a Docker engine that already answers (DOCKER_HOST, or the default socket) is
  used as it is; nothing is started, nothing is configured.
- podman (these machines: no Docker engine, no registry, no systemd): the harness starts
  `podman system service` on a socket in a temporary directory, with the project's own
  containers.conf beside it (CONTAINERS_CONF: runc, since crun refuses hybrid cgroups;
  ulimits root may set here; netavark), and points DOCKER_HOST at it. At the end the
  service is stopped and the directory removed; nothing system-wide is written except
  podman's own image store (/var/lib/containers), which is the cache between runs.

EDGEKMS_CONTAINER_ENGINE=docker|podman|auto (default auto: Docker if one answers, else
podman) chooses. Where neither can run, `unavailable()` says precisely why and the
tests skip with that reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mgmt import subprocs

ROOT = Path(__file__).resolve().parents[2]

# What podman needs on these machines, and nothing a user's own podman would miss.
CONTAINERS_CONF = """\
# EdgeKMS's own podman settings (CONTAINERS_CONF), for the tests' podman service only.
[containers]
# root here cannot raise RLIMIT_NOFILE past 20000 nor RLIMIT_NPROC to 65536.
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
# crun refuses hybrid cgroups ("cgroups in hybrid mode not supported").
runtime = "runc"

[network]
# User-defined networks with name resolution (aardvark-dns).
network_backend = "netavark"
"""


class EngineUnavailable(RuntimeError):
    """No container engine can run here; the message says why (the skip reason)."""


@dataclass
class Engine:
    """An engine that answers the Docker API at `env["DOCKER_HOST"]` (or the default)."""

    kind: str  # "docker" or "podman"
    env: dict[str, str]
    compose: list[str]
    service: subprocess.Popen[bytes] | None = None
    workdir: Path | None = None

    def run(
        self, argv: list[str], timeout: float, cwd: Path = ROOT, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            argv,
            env=self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv[:4])} ... exited {result.returncode}: {result.stderr[-3000:]}"
            )
        return result

    def cli(self) -> str:
        """The engine's own CLI (image sizes, base image import)."""
        return "podman" if self.kind == "podman" else "docker"


def _docker_answers(env: Mapping[str, str]) -> str | None:
    """None if a Docker API answers with these settings, else why not."""
    host = env.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        return None if shutil.which("docker") else "DOCKER_HOST is TCP and no docker CLI"
    path = host.removeprefix("unix://")
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(path)
            sock.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
            reply = sock.recv(64)
    except OSError as exc:
        return f"no Docker engine at {host} ({type(exc).__name__})"
    return None if b" 200 " in reply else f"the engine at {host} does not answer /_ping"


def compose_command(env: Mapping[str, str]) -> list[str] | None:
    """The compose CLI: the v2 plugin (`docker compose`) or Debian's docker-compose 1.29."""
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"],
            env=dict(env),
            capture_output=True,
            timeout=20,
            check=False,
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def _wait_for_socket(path: Path, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EngineUnavailable(f"podman system service exited with {process.returncode}")
        if path.exists() and _docker_answers({"DOCKER_HOST": f"unix://{path}"}) is None:
            return
        time.sleep(0.2)
    raise EngineUnavailable(f"podman system service made no socket at {path} in {timeout}s")


@contextmanager
def podman_engine(timeout: float = 60.0) -> Iterator[Engine]:
    """podman's Docker API on a private socket, with the project's containers.conf."""
    if shutil.which("podman") is None:
        raise EngineUnavailable("no Docker engine answers and podman is not installed")
    if os.geteuid() != 0:
        raise EngineUnavailable("podman is installed but the tests run it rootful only")
    workdir = Path(tempfile.mkdtemp(prefix="edgekms-podman-"))
    conf = workdir / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    sock = workdir / "podman.sock"
    env = {
        **os.environ,
        "CONTAINERS_CONF": str(conf),
        "DOCKER_HOST": f"unix://{sock}",
        # testcontainers-python, should a test use it: no reaper image can be pulled,
        # and /.dockerenv on these machines would make it guess the wrong network.
        "TESTCONTAINERS_RYUK_DISABLED": "true",
        "TESTCONTAINERS_CONNECTION_MODE": "docker_host",
    }
    service = subprocs.spawn(
        ["podman", "system", "service", "--time=0", f"unix://{sock}"],
        workdir / "service.log",
        env,
    )
    try:
        _wait_for_socket(sock, service, timeout)
        compose = compose_command(env)
        if compose is None:
            raise EngineUnavailable("no compose CLI (docker compose plugin or docker-compose)")
        yield Engine("podman", env, compose, service=service, workdir=workdir)
    finally:
        subprocs.end(service)
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def engine() -> Iterator[Engine]:
    """The engine EDGEKMS_CONTAINER_ENGINE asks for; EngineUnavailable says why not."""
    wanted = os.environ.get("EDGEKMS_CONTAINER_ENGINE", "auto")
    if wanted not in ("auto", "docker", "podman"):
        raise EngineUnavailable(f"EDGEKMS_CONTAINER_ENGINE={wanted!r}: docker, podman or auto")
    env = dict(os.environ)
    docker_reason = _docker_answers(env) if wanted != "podman" else "podman asked for"
    if docker_reason is None:
        compose = compose_command(env)
        if compose is None:
            raise EngineUnavailable("a Docker engine answers but no compose CLI is installed")
        yield Engine("docker", env, compose)
        return
    if wanted == "docker":
        raise EngineUnavailable(docker_reason)
    with podman_engine() as found:
        yield found


def image_builders(compose: Mapping[str, Any]) -> list[str]:
    """One service per image to build: every edgekms role shares one image, and compose
    would otherwise build it once per service (seven cached builds, ~10 s each)."""
    seen: dict[str, str] = {}
    for name, service in compose["services"].items():
        if "build" in service:
            seen.setdefault(service.get("image", name), name)
    return sorted(seen.values())


def build_images(found: Engine, timeout: float = 1800.0) -> None:
    """The base image (pulled, or made with debootstrap), the wheelhouse, then compose
    build; every step reuses what an earlier run left (image store, build/wheelhouse)."""
    env = {**found.env, "PY": sys.executable}
    builder = Engine(found.kind, env, found.compose)
    builder.run([str(ROOT / "scripts" / "base-image.sh"), found.cli()], timeout)
    builder.run([str(ROOT / "scripts" / "wheelhouse.sh")], timeout)
    services = image_builders(yaml.safe_load((ROOT / "compose.yaml").read_text()))
    builder.run([*found.compose, "-f", "compose.yaml", "build", *services], timeout)
