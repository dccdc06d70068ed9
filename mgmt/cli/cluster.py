"""`kmsctl cluster`: make what the nodes of one cluster share, once (mgmt.clusterinit)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from mgmt.cli.common import output_option
from mgmt.cli.output import echo_json, handle_errors

if TYPE_CHECKING:
    from mgmt.clusterinit import ClusterSpec


@click.group()
def cluster() -> None:
    """Run EdgeKMS on several boxes: one bundle per node, then `kmsctl up --join`."""


@cluster.command("init")
@click.option(
    "--name", required=True, help="The cluster's name (a-z 0-9 _ -), the same on every node."
)
@click.option(
    "--node",
    "nodes",
    multiple=True,
    required=True,
    metavar="NAME=HOST[:ROUTE_PORT[:BROKER_PORT]]",
    help="A node (repeat, 1 to 5; 3 for a cluster that survives losing one): the address "
    "the other nodes and clients reach it at, its route port (default 6222) and broker "
    "port (default 8443). The first one runs the bootstrap ceremony and holds the "
    "internal CA's key.",
)
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for the bundles (one subdirectory per node, 0700; must not exist or "
    "be empty), and OUT/_admin with the route CA's key (keep it off the nodes; "
    "`cluster add-node --route-ca` needs it). Carry each bundle to its node by a private "
    "channel and delete the rest.",
)
@output_option
@handle_errors
def init(name: str, nodes: tuple[str, ...], out: Path, output: str) -> None:
    """Make one bundle per node of a new cluster, once.

    \b
    Each bundle holds the cluster's shape, the route password, the join key and the
    record-sealing keys, all shared by every node, and the node's own route certificate
    and key (routes are TLS; 0600 files; nothing secret is printed). The route CA's key
    goes to OUT/_admin, for `cluster add-node` only. On each node, start it with its
    own bundle:
      kmsctl cluster init --name office --node nas1=10.0.0.1 --node nas2=10.0.0.2 \
          --node nas3=10.0.0.3 --out bundles
      kmsctl up --data-dir /var/lib/edgekms --join bundles/nas1
    The first node makes the internal CA and the admin client config (listing every
    broker); the others take its PKI over the cluster. Every bucket and audit stream
    gets one copy per node (R3 on three). See docs/cluster.md.
    """
    from mgmt.clusterinit import make_spec, parse_node, write_bundles
    from mgmt.routeca import ADMIN_DIR

    spec = make_spec(name, [parse_node(n) for n in nodes])
    made = write_bundles(spec, out)
    _report(spec, made, output, route_ca=out / ADMIN_DIR)
    if output != "json":
        click.echo("Start each node with `kmsctl up --join <its bundle>`.")


@cluster.command("add-node")
@click.option(
    "--from",
    "source",
    required=True,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="A bundle of the cluster, or a node's DATA_DIR/secrets/cluster: its secrets and "
    "node list are kept.",
)
@click.option(
    "--node",
    "nodes",
    multiple=True,
    metavar="NAME=HOST[:ROUTE_PORT[:BROKER_PORT]]",
    help="A node to add (repeat; none: the same nodes, new route certificates).",
)
@click.option(
    "--route-ca",
    "route_ca_dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="The route CA `cluster init` wrote (OUT/_admin): it issues every node's route "
    "certificate. Required when the --from bundle has route TLS; without it, for a "
    "bundle made before route TLS, a new route CA is made (OUT/_admin).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for the new bundles (every node's, the old ones included).",
)
@output_option
@handle_errors
def add_node(
    source: Path, nodes: tuple[str, ...], route_ca_dir: Path | None, out: Path, output: str
) -> None:
    """Bundles for a cluster grown by one or more nodes, with the same secrets.

    \b
    Every node gets a new bundle (the node list and the copies of each stream change),
    with a route certificate from the cluster's route CA:
      kmsctl cluster add-node --from bundles/nas1 --route-ca bundles/_admin \
          --node nas4=10.0.0.4 --out bundles-4
    Start the new node with its bundle, then restart each old node with its new one
    (`kmsctl up --join bundles-4/<node>` on its data dir): its routes and the copies of
    every stream follow the new list. The first node stays first. Without --node it
    reissues the same nodes' bundles (new route certificates).
    """
    from edgekms.errors import FailedPrecondition
    from mgmt.clusterinit import (
        make_spec,
        parse_node,
        read_routes_ca,
        read_secrets,
        write_bundles,
    )
    from mgmt.routeca import check_same_ca, load_route_ca

    spec, shared = read_secrets(source)
    grown = make_spec(spec.name, [*spec.nodes, *(parse_node(n) for n in nodes)])
    trusted = read_routes_ca(source)
    route_ca = None
    if route_ca_dir is not None:
        route_ca = load_route_ca(route_ca_dir)
        check_same_ca(route_ca, trusted, source)
    elif trusted is not None:
        raise FailedPrecondition(
            "cluster.route_ca_required",
            f"{source} has route TLS: give its route CA (--route-ca, the OUT/_admin of "
            "`kmsctl cluster init`) to issue the nodes' route certificates",
            {"path": str(source)[:200]},
        )
    made = write_bundles(grown, out, from_bundle=shared, route_ca=route_ca)
    _report(grown, made, output)


def _report(spec: ClusterSpec, made: list[Path], output: str, route_ca: Path | None = None) -> None:
    """What init and add-node wrote: one bundle per node, the first one named, and
    where init put the route CA (`OUT/_admin`, kept off the nodes)."""
    if output == "json":
        echo_json(
            {
                "cluster": spec.name,
                "replicas": spec.replicas,
                "bundles": {n.name: str(path) for n, path in zip(spec.nodes, made, strict=True)},
                **({"route_ca": str(route_ca)} if route_ca is not None else {}),
            }
        )
        return
    click.echo(f"Cluster {spec.name}: {len(made)} node(s), {spec.replicas} copies of every stream.")
    for node, path in zip(spec.nodes, made, strict=True):
        role = " (first: runs the ceremony)" if node.name == spec.first.name else ""
        click.echo(f"  {node.name:<12} {path}{role}")
    if route_ca is not None:
        click.echo(f"  {'route CA':<12} {route_ca} (keep it off the nodes)")


def register(cli: click.Group) -> None:
    cli.add_command(cluster)
