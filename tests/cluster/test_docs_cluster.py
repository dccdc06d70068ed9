"""docs/cluster.md's "Three nodes with `kmsctl up`" and "Adding and removing a node", run
as written on loopback (issue 14, item 9): `kmsctl cluster init` with each node's address
`10.0.0.N` replaced by 127.0.0.1 and free route and broker ports, the three `kmsctl up
--join` nodes from the doc's line (its data dir per node, the fixture's free ports for
NATS, the CA's HTTP and enrollment, as tests/cluster/test_up_nodes.py starts them), the
admin's commands in a directory holding a copy of nas1's `client/`, and `cluster
add-node` for a fourth node. nas1 is started by "Fleet"'s "A hub that is a cluster"
line (`--join bundles/nas1 --leaf-listen`), the same line with its leaf listener. Lines
come from the doc (tests/doccommands.py)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tomllib
from pathlib import Path

import pytest

from mgmt.natsserver import free_port
from tests.cluster.test_up_nodes import NODES, Node, _start, _wait_ready
from tests.doccommands import ROOT, block, lines, run_lines

DOC = "docs/cluster.md"
THREE = "## Three nodes with `kmsctl up`"
ADDING = "## Adding and removing a node"
FLEET = "## Fleet: devices as leaf nodes"
ENV_PATH = f"{ROOT}/.venv/bin:/usr/bin:/bin"

pytestmark = pytest.mark.timeout(600)


def _addresses(text: str, ports: dict[str, tuple[int, int]]) -> str:
    """`nasN=10.0.0.N` -> `nasN=127.0.0.1:ROUTE:BROKER` (the doc's node syntax)."""
    return re.sub(
        r"(nas\d)=10\.0\.0\.\d",
        lambda m: f"{m.group(1)}=127.0.0.1:{ports[m.group(1)][0]}:{ports[m.group(1)][1]}",
        text,
    )


def test_cluster_doc_three_nodes_and_add_node_run_as_written(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKMS_")}
    env["PATH"] = ENV_PATH
    ports = {n: (free_port(), free_port()) for n in (*NODES, "nas4")}
    leaf = f"127.0.0.1:{free_port()}"

    init = lines(_addresses(block(DOC, THREE, 0).text, ports))
    assert len(init) == 1 and "127.0.0.1:" in init[0]
    run_lines(init, tmp_path, env)
    bundles = tmp_path / "bundles"
    assert sorted(p.name for p in bundles.iterdir()) == ["_admin", *NODES]

    (up,) = lines(block(DOC, THREE, 1).text)
    assert shlex.split(up) == [
        "kmsctl", "up", "--data-dir", "/var/lib/edgekms/node", "--join", "bundles/nas1"
    ]  # fmt: skip
    nodes = [Node(n, tmp_path / n / "node", f"127.0.0.1:{ports[n][1]}", bundles / n) for n in NODES]
    try:
        # nas1 is also the fleet's hub, as "A hub that is a cluster" starts it (that
        # line's --leaf-listen, on a free port); nas2 and nas3 as the line above.
        (hub_line,) = lines(block(DOC, FLEET, 7).text.replace("0.0.0.0:7422", leaf))
        hub_args = shlex.split(hub_line)
        assert hub_args[:6] == shlex.split(up) and hub_args[6:] == ["--leaf-listen", leaf]
        for node in nodes:
            node.data_dir.parent.mkdir()
            _start(node, *(hub_args[6:] if node.name == "nas1" else []))
        _wait_ready(nodes, 240)
        state = json.loads((nodes[0].data_dir / "run" / "state.json").read_text())
        assert state["fleet"]["role"] == "hub" and state["fleet"]["leaf_listen"] == leaf

        # The admin's machine: a copy of nas1's client/ beside it, as the doc says.
        admin = tmp_path / "admin"
        shutil.copytree(nodes[0].data_dir / "client", admin / "client")
        ran = run_lines(lines(block(DOC, THREE, 2).text), admin, env)
        made, status, ca, verified = ran
        assert "office/web" in made.out
        for provider in ("crypto/hsm-nas1", "crypto/hsm-nas2", "crypto/hsm-nas3"):
            assert provider in status.out, status.out
        assert "Office CA" in ca.out
        assert verified.code == 0 and verified.out.strip()
    finally:
        for node in nodes:
            node.stop()

    added = lines(_addresses(block(DOC, ADDING, 0).text, ports))
    run_lines(added, tmp_path, env)
    grown = tmp_path / "bundles-4"
    assert sorted(p.name for p in grown.iterdir()) == ["nas1", "nas2", "nas3", "nas4"]
    spec = tomllib.loads((grown / "nas4" / "cluster.toml").read_text())
    assert (spec["cluster"], spec["node"]) == ("office", "nas4")
    assert [n["name"] for n in spec["nodes"]] == ["nas1", "nas2", "nas3", "nas4"]
    # The same secrets as the first bundles: the old nodes take theirs and keep the data.
    for secret in ("route.password", "join.key"):
        assert (grown / "nas1" / secret).read_bytes() == (bundles / "nas1" / secret).read_bytes()
