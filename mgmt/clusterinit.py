"""What the nodes of one cluster share, made once, and how a node joins with it.

`kmsctl cluster init` writes one bundle per node (a 0700 directory of 0600 files): the
cluster's shape (cluster.toml: its name, every node's address, route port and broker
port, and which node this bundle is for), the route password, the node's route
certificate and key and the route CA's certificate (mgmt.routeca: routes are TLS, each
side checking the other's certificate), the record-sealing keys (each broker verifies
what every other broker sealed, so all hold the same writer keys) and a join key. The
route CA's key goes to OUT/_admin only. `kmsctl up --join BUNDLE` installs the bundle
into the data dir's secrets and runs that node.

The first node listed runs the bootstrap ceremony, once for the cluster: the internal CA
(its key in that node's token), the broker certificate naming every node, the admin
client config listing every broker. The other nodes must not make a second CA: they
ask the bus for the internal CA certificate and the broker's certificate and key, which
every node that has them answers with, sealed with AES-GCM under the join key (only
bundle holders can read or forge them; the bus identities of services cannot even
subscribe to the subject). Bus TLS and bus passwords stay per node: each nats-server
authenticates only its own node's processes, and routes carry the messages between.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgekms.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from edgekms.sealed import WRITERS, new_signing_key_pem
from mgmt.pki import PkiPaths, write_private
from mgmt.routeca import (
    ADMIN_DIR,
    ROUTE_CERT_FILE,
    ROUTE_FILES,
    ROUTE_KEY_FILE,
    ROUTES_CA_FILE,
    RouteCA,
    RouteFiles,
    check_route_files,
    issue_route,
    new_route_ca,
    write_route_ca,
)

CLUSTER_FILE = "cluster.toml"
ROUTE_PASSWORD_FILE = "route.password"  # noqa: S105 - a file name
JOIN_KEY_FILE = "join.key"
DEFAULT_ROUTE_PORT = 6222
DEFAULT_BROKER_PORT = 8443
# A node name is a token of subjects and provider ids (hsm-<node>), and nats-server's
# server_name: short, lowercase, no dots.
NODE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,30}$")
MAX_NODES = 5  # JetStream's most copies of a stream (edgekms.kvstore.MAX_REPLICAS)
MAX_BUNDLE_FILE = 64 * 1024


@dataclass(frozen=True)
class ClusterNode:
    """One node: its name, the address the others reach it at, its route and broker ports."""

    name: str
    host: str
    route_port: int = DEFAULT_ROUTE_PORT
    broker_port: int = DEFAULT_BROKER_PORT

    @property
    def provider(self) -> str:
        """The node's token as a provider: its own id, since a provider id is a subject
        that spans the cluster (docs/cluster.md, "Keys on their node")."""
        return f"hsm-{self.name}"

    def address(self, port: int) -> str:
        return f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"

    @property
    def route(self) -> str:
        return self.address(self.route_port)

    @property
    def broker(self) -> str:
        return self.address(self.broker_port)


@dataclass(frozen=True)
class ClusterSpec:
    """The cluster's shape, the same in every bundle; the first node runs the ceremony."""

    name: str
    nodes: tuple[ClusterNode, ...]

    @property
    def first(self) -> ClusterNode:
        return self.nodes[0]

    @property
    def replicas(self) -> int:
        """Copies of every bucket and audit stream: one per node (R3 on three)."""
        return len(self.nodes)

    @property
    def providers(self) -> list[str]:
        return [n.provider for n in self.nodes]

    def node(self, name: str) -> ClusterNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise InvalidArgument(
            "cluster.node_unknown",
            f"cluster {self.name!r} has no node {name!r} ({', '.join(n.name for n in self.nodes)})",
            {"node": name},
        )


@dataclass(frozen=True)
class JoinBundle:
    """A node's bundle as installed under DATA_DIR/secrets/cluster."""

    spec: ClusterSpec
    node: ClusterNode
    route_password_file: Path
    join_key_file: Path
    # This node's route certificate, its key and the route CA's certificate; None for a
    # bundle made before routes had TLS (plain routes, with a warning: docs/cluster.md).
    route_tls: tuple[Path, Path, Path] | None = None

    @property
    def is_first(self) -> bool:
        return self.node.name == self.spec.first.name

    def route_password(self) -> str:
        return self.route_password_file.read_text().strip()

    def join_key(self) -> bytes:
        return bytes.fromhex(self.join_key_file.read_text().strip())


def parse_node(text: str) -> ClusterNode:
    """NAME=HOST[:ROUTE_PORT[:BROKER_PORT]] (an IPv6 host in brackets)."""
    name, sep, rest = text.partition("=")
    if not sep or not NODE_RE.match(name):
        raise InvalidArgument(
            "cluster.node_invalid",
            f"{text!r}: want NAME=HOST[:ROUTE_PORT[:BROKER_PORT]], NAME of a-z 0-9 _ - "
            "(at most 31)",
            {"node": text[:64]},
        )
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        ports = tail.removeprefix(":").split(":") if tail else []
    else:
        host, *ports = rest.split(":")
    if not host or len(ports) > 2 or any(not p.isdigit() or not 0 < int(p) < 65536 for p in ports):
        raise InvalidArgument(
            "cluster.node_invalid",
            f"{text!r}: want NAME=HOST[:ROUTE_PORT[:BROKER_PORT]], ports 1..65535",
            {"node": text[:64]},
        )
    route = int(ports[0]) if ports else DEFAULT_ROUTE_PORT
    broker = int(ports[1]) if len(ports) > 1 else DEFAULT_BROKER_PORT
    return ClusterNode(name, host, route, broker)


def make_spec(name: str, nodes: list[ClusterNode]) -> ClusterSpec:
    """A cluster of 1..MAX_NODES distinct nodes, each address used once."""
    if not NODE_RE.match(name):
        raise InvalidArgument(
            "cluster.name_invalid", f"{name!r}: a cluster name of a-z 0-9 _ - (at most 31)"
        )
    if not 1 <= len(nodes) <= MAX_NODES:
        raise InvalidArgument(
            "cluster.size_invalid", f"a cluster has 1 to {MAX_NODES} nodes, not {len(nodes)}"
        )
    names = [n.name for n in nodes]
    routes = [n.route for n in nodes]
    brokers = [n.broker for n in nodes]
    for what, values in (("name", names), ("route address", routes), ("broker address", brokers)):
        if len(set(values)) != len(values):
            raise InvalidArgument(
                "cluster.node_duplicate", f"two nodes have the same {what}", {"what": what}
            )
    return ClusterSpec(name, tuple(nodes))


def render_spec(spec: ClusterSpec, node: str) -> str:
    lines = [
        "# EdgeKMS cluster bundle, written by `kmsctl cluster init`.",
        f"cluster = {json.dumps(spec.name)}",
        f"node = {json.dumps(node)}",
    ]
    for n in spec.nodes:
        lines += [
            "[[nodes]]",
            f"name = {json.dumps(n.name)}",
            f"host = {json.dumps(n.host)}",
            f"route_port = {n.route_port}",
            f"broker_port = {n.broker_port}",
        ]
    return "\n".join(lines) + "\n"


def _bad_bundle(where: Path, why: str) -> InvalidArgument:
    return InvalidArgument("cluster.bundle_invalid", f"{where}: {why}", {"path": str(where)[:200]})


def read_spec(path: Path) -> tuple[ClusterSpec, str]:
    """The cluster and this bundle's node from cluster.toml; cluster.bundle_invalid for
    anything missing, malformed or oversized."""
    try:
        if path.stat().st_size > MAX_BUNDLE_FILE:
            raise _bad_bundle(path, "too large for a cluster file")
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise _bad_bundle(path, f"not readable as TOML ({type(exc).__name__})") from None
    nodes_raw = raw.get("nodes")
    if not isinstance(raw.get("cluster"), str) or not isinstance(raw.get("node"), str):
        raise _bad_bundle(path, "needs `cluster` and `node` strings")
    if not isinstance(nodes_raw, list) or not all(isinstance(n, dict) for n in nodes_raw):
        raise _bad_bundle(path, "needs a [[nodes]] list")
    nodes: list[ClusterNode] = []
    for entry in nodes_raw:
        name, host = entry.get("name"), entry.get("host")
        route, broker = entry.get("route_port"), entry.get("broker_port")
        if not (
            isinstance(name, str)
            and isinstance(host, str)
            and host
            and NODE_RE.match(name)
            and isinstance(route, int)
            and isinstance(broker, int)
            and 0 < route < 65536
            and 0 < broker < 65536
        ):
            raise _bad_bundle(path, "a [[nodes]] entry needs name, host, route_port, broker_port")
        nodes.append(ClusterNode(name, host, route, broker))
    try:
        spec = make_spec(raw["cluster"], nodes)
        spec.node(raw["node"])
    except InvalidArgument as exc:
        raise _bad_bundle(path, exc.message) from None
    return spec, raw["node"]


Secrets = tuple[str, str, dict[str, bytes]]


def _new_secrets() -> Secrets:
    """A new cluster's route password, join key (hex) and record-sealing keys."""
    seal_keys = {writer: new_signing_key_pem()[0] for writer in WRITERS}
    return secrets.token_urlsafe(32), secrets.token_bytes(32).hex(), seal_keys


def read_secrets(bundle_dir: Path) -> tuple[ClusterSpec, Secrets]:
    """An existing bundle's cluster and shared secrets (for `kmsctl cluster add-node`):
    a bundle dir, or a node's installed DATA_DIR/secrets/cluster with its seal keys
    beside it in DATA_DIR/secrets/seal."""
    spec, _ = read_spec(bundle_dir / CLUSTER_FILE)
    seal_dir = bundle_dir / "seal"
    if not seal_dir.is_dir():
        seal_dir = bundle_dir.parent / "seal"
    password = _read_small(bundle_dir / ROUTE_PASSWORD_FILE).decode().strip()
    join_key = _read_small(bundle_dir / JOIN_KEY_FILE).decode().strip()
    seal_keys = {w: _read_small(seal_dir / f"{w}.key") for w in WRITERS}
    return spec, (password, join_key, seal_keys)


def read_routes_ca(bundle_dir: Path) -> bytes | None:
    """The route CA certificate a bundle (or installed DATA_DIR/secrets/cluster) trusts;
    None for a bundle made before routes had TLS."""
    path = bundle_dir / ROUTES_CA_FILE
    return _read_small(path) if path.exists() else None


def write_bundles(
    spec: ClusterSpec,
    out: Path,
    from_bundle: Secrets | None = None,
    route_ca: RouteCA | None = None,
) -> list[Path]:
    """One bundle per node under `out` (OUT/<node>/), sharing one route password, one
    join key and one set of record-sealing keys: new ones, or `from_bundle`'s (a node
    added to a running cluster). Each bundle gets its node's route certificate and key
    from `route_ca`; without one, a new route CA is made and its key written to
    OUT/_admin only (mgmt.routeca says why). Refuses (cluster.bundle_exists) an `out`
    that holds anything, so a second run never mints a second set of secrets beside
    the first."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AlreadyExists(
            "cluster.bundle_exists",
            f"{out} exists and is not empty: bundles are made once per cluster",
            {"path": str(out)},
        )
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    shared = from_bundle or _new_secrets()
    route_password, join_key, seal_keys = shared
    if route_ca is None:
        route_ca = new_route_ca(spec.name)
        write_route_ca(route_ca, out / ADMIN_DIR)
    made = []
    for node in spec.nodes:
        directory = out / node.name
        directory.mkdir(mode=0o700)
        write_private(directory / CLUSTER_FILE, render_spec(spec, node.name).encode())
        write_private(directory / ROUTE_PASSWORD_FILE, (route_password + "\n").encode())
        write_private(directory / JOIN_KEY_FILE, (join_key + "\n").encode())
        for writer, pem in seal_keys.items():
            write_private(directory / "seal" / f"{writer}.key", pem)
        for name, pem in issue_route(route_ca, node.name, node.host).by_name().items():
            write_private(directory / name, pem)
        made.append(directory)
    return made


def installed_dir(secrets_dir: Path) -> Path:
    return secrets_dir / "cluster"


def install_bundle(bundle_dir: Path, secrets_dir: Path) -> JoinBundle:
    """Copy a node's bundle into the data dir's secrets (once; the same bundle again
    changes nothing). Refused with FailedPrecondition when the data dir belongs to
    another cluster or node (`cluster.other_cluster`), or holds sealing keys other than
    the bundle's (`cluster.seal_mismatch`: a single-box stack's records would not open)."""
    spec, node_name = read_spec(bundle_dir / CLUSTER_FILE)
    secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = {
        CLUSTER_FILE: bundle_dir / CLUSTER_FILE,
        ROUTE_PASSWORD_FILE: bundle_dir / ROUTE_PASSWORD_FILE,
        JOIN_KEY_FILE: bundle_dir / JOIN_KEY_FILE,
    }
    seal_files = {w: bundle_dir / "seal" / f"{w}.key" for w in WRITERS}
    contents: dict[Path, bytes] = {}
    target = installed_dir(secrets_dir)
    for name, source in files.items():
        contents[target / name] = _read_small(source)
    route = _read_route_files(bundle_dir, spec.node(node_name).host)
    stale: list[Path] = []
    if route is None:
        # A bundle from before route TLS: the node runs plain routes (a warning), and
        # no route files of an earlier bundle stay behind to be used.
        stale = [target / name for name in ROUTE_FILES]
    else:
        contents.update({target / name: pem for name, pem in route.by_name().items()})
    try:
        bytes.fromhex(contents[target / JOIN_KEY_FILE].decode().strip())
    except ValueError:
        raise _bad_bundle(files[JOIN_KEY_FILE], "not a hex key") from None
    for writer, source in seal_files.items():
        data = _read_small(source)
        try:
            load_signing_key_bytes(data)
        except ValueError:
            raise _bad_bundle(source, "not a record-sealing key") from None
        contents[secrets_dir / "seal" / f"{writer}.key"] = data
    installed = target / CLUSTER_FILE
    if installed.exists():
        old_spec, old_node = read_spec(installed)
        if old_spec.name != spec.name or old_node != node_name:
            raise FailedPrecondition(
                "cluster.other_cluster",
                f"this data dir is node {old_node!r} of cluster {old_spec.name!r}, not "
                f"{node_name!r} of {spec.name!r}",
                {"cluster": old_spec.name, "node": old_node},
            )
    for path, data in contents.items():
        if path.parent.name == "seal" and path.exists() and path.read_bytes() != data:
            raise FailedPrecondition(
                "cluster.seal_mismatch",
                f"{path} differs from the bundle's: this data dir sealed records with keys "
                "of its own (a single-box stack cannot join a cluster; start a fresh data dir)",
                {"path": str(path)},
            )
    for path in stale:
        path.unlink(missing_ok=True)
    for path, data in contents.items():
        write_private(path, data)
    return load_installed(secrets_dir)


def _read_route_files(bundle_dir: Path, host: str) -> RouteFiles | None:
    """A bundle's route TLS files, checked (mgmt.routeca.check_route_files); None when
    it has none at all, cluster.bundle_invalid when it has some but not all."""
    present = [name for name in ROUTE_FILES if (bundle_dir / name).exists()]
    if not present:
        return None
    if len(present) != len(ROUTE_FILES):
        missing = sorted(set(ROUTE_FILES) - set(present))
        raise _bad_bundle(
            bundle_dir, f"route TLS needs {', '.join(ROUTE_FILES)}, all three: no {missing[0]}"
        )
    files = RouteFiles(
        _read_small(bundle_dir / ROUTE_CERT_FILE),
        _read_small(bundle_dir / ROUTE_KEY_FILE),
        _read_small(bundle_dir / ROUTES_CA_FILE),
    )
    check_route_files(files, host, bundle_dir)
    return files


def load_installed(secrets_dir: Path) -> JoinBundle:
    target = installed_dir(secrets_dir)
    spec, node_name = read_spec(target / CLUSTER_FILE)
    route = tuple(target / name for name in (ROUTE_CERT_FILE, ROUTE_KEY_FILE, ROUTES_CA_FILE))
    return JoinBundle(
        spec,
        spec.node(node_name),
        target / ROUTE_PASSWORD_FILE,
        target / JOIN_KEY_FILE,
        (route[0], route[1], route[2]) if all(p.exists() for p in route) else None,
    )


def load_signing_key_bytes(data: bytes) -> None:
    """ValueError unless `data` is a record-sealing (Ed25519) private key PEM."""
    try:
        key = serialization.load_pem_private_key(data, None)
    except (ValueError, TypeError) as exc:
        raise ValueError(type(exc).__name__) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("not an Ed25519 key")


def _read_small(path: Path) -> bytes:
    try:
        if path.stat().st_size > MAX_BUNDLE_FILE:
            raise _bad_bundle(path, "too large for a bundle file")
        return path.read_bytes()
    except OSError as exc:
        raise _bad_bundle(path, f"missing or unreadable ({type(exc).__name__})") from None


def add_brokers(client_config: Path, brokers: list[str]) -> None:
    """List the other nodes' brokers in the admin's client config, for failover."""
    from mgmt.pki import write_client_config

    values = tomllib.loads(client_config.read_text())
    values["brokers"] = brokers
    write_client_config(
        client_config,
        **{k: [str(i) for i in v] if isinstance(v, list) else str(v) for k, v in values.items()},
    )


# --- the PKI the first node made, passed to the others over the bus ------------------


@dataclass(frozen=True)
class SharedPki:
    ca_cert: bytes
    broker_cert: bytes
    broker_key: bytes


def read_pki(paths: PkiPaths) -> SharedPki | None:
    """The ceremony's shared files, or None until all three exist."""
    try:
        return SharedPki(
            paths.ca_cert.read_bytes(),
            paths.broker_cert.read_bytes(),
            paths.broker_key.read_bytes(),
        )
    except FileNotFoundError:
        return None


def write_pki(paths: PkiPaths, pki: SharedPki) -> None:
    """The broker key 0600; certificates readable. The CA certificate last: with it the
    node counts as having its PKI (Stack._ceremony_done)."""
    write_private(paths.broker_key, pki.broker_key)
    write_private(paths.broker_cert, pki.broker_cert)
    write_private(paths.ca_cert, pki.ca_cert)


def seal_pki(bundle: JoinBundle, pki: SharedPki) -> bytes:
    """The PKI as AES-256-GCM under the join key, bound to the cluster's name."""
    body = json.dumps({k: v.decode() for k, v in dataclasses.asdict(pki).items()}).encode()
    nonce = secrets.token_bytes(12)
    return nonce + AESGCM(bundle.join_key()).encrypt(nonce, body, _aad(bundle))


def open_pki(bundle: JoinBundle, blob: bytes) -> SharedPki:
    """The PKI a node answered with; InvalidArgument `cluster.pki_forged` when it was
    not sealed under this cluster's join key (a process on the bus that is not a node)."""
    try:
        body = AESGCM(bundle.join_key()).decrypt(blob[:12], blob[12:], _aad(bundle))
        fields_ = json.loads(body)
        return SharedPki(
            fields_["ca_cert"].encode(),
            fields_["broker_cert"].encode(),
            fields_["broker_key"].encode(),
        )
    except (InvalidTag, ValueError, KeyError, TypeError, AttributeError):
        raise InvalidArgument(
            "cluster.pki_forged",
            "an answer on the cluster's PKI subject was not sealed with this cluster's join key",
        ) from None


def _aad(bundle: JoinBundle) -> bytes:
    return f"edgekms-cluster-pki:{bundle.spec.name}".encode()
