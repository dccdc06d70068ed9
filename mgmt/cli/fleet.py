"""`kmsctl fleet`: a hub's devices, each a leaf node with its own stack (mgmt.uplink)."""

from __future__ import annotations

from pathlib import Path

import click

from mgmt.cli.common import data_dir_option, output_option
from mgmt.cli.output import echo_json, handle_errors, table


@click.group()
def fleet() -> None:
    """A fleet hub's devices: uplink bundles for `kmsctl up --uplink`, list, remove."""


@fleet.command("add-device")
@click.argument("device")
@data_dir_option
@click.option(
    "--hub",
    "hub_address",
    required=True,
    metavar="HOST:PORT",
    help="Where the device reaches the hub's leaf listener (`kmsctl up --leaf-listen`); "
    "HOST goes into the hub's leaf certificate.",
)
@click.option(
    "--provider",
    "providers",
    multiple=True,
    default=("hsm0",),
    show_default=True,
    help="The device stack's crypto providers (repeat; add tpm0 for a device started "
    "with --tpm): the hub copies each one's audit stream.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the device's uplink bundle (a new 0600 file). It holds the "
    "device's hub password: carry it to the device by a private channel, then delete it.",
)
@output_option
@handle_errors
def add_device(
    device: str,
    data_dir: Path,
    hub_address: str,
    providers: tuple[str, ...],
    out: Path,
    output: str,
) -> None:
    """Add DEVICE (a-z 0-9 -) to this hub's fleet and write its uplink bundle.

    \b
    Run on the hub, with the hub's data dir. The bundle holds the device's id, the hub's
    leaf address, the device's hub password and the CA of the hub's leaf certificate:
      kmsctl fleet add-device a1 --hub hub.lan:7422 --out uplink-a1.toml
      kmsctl up --uplink uplink-a1.toml          (on the device)
    A hub already running (`kmsctl up --leaf-listen`) takes the new device within a few
    seconds: it reloads nats-server (SIGHUP) with the device's bus user and makes the
    hub's copy of its audit (KMS_FLEET_<ID>). Adding it again writes a new bundle with the
    same password. Nothing secret is printed.
    """
    from mgmt.uplink import add_device as add
    from mgmt.uplink import make_bundle, write_bundle

    record, password, tls = add(data_dir, device, hub_address, providers)
    write_bundle(make_bundle(device, hub_address, password, tls), out)
    if output == "json":
        echo_json({"device": device, "writers": list(record.writers), "bundle": str(out)})
        return
    click.echo(f"Device {device}: bundle {out} (0600; secret).")
    click.echo(f"Start it with `kmsctl up --uplink {out.name}` on the device.")


@fleet.command("list")
@data_dir_option
@output_option
@handle_errors
def list_(data_dir: Path, output: str) -> None:
    """The devices of this hub's fleet and the audit writers the hub copies of each.

    \b
      kmsctl fleet list
    """
    from mgmt.uplink import list_devices

    devices = list_devices(data_dir)
    if output == "json":
        echo_json([{"device": r.device, "writers": list(r.writers)} for r in devices])
        return
    if not devices:
        click.echo("No devices.")
        return
    click.echo(table(["DEVICE", "WRITERS"], [[r.device, ",".join(r.writers)] for r in devices]))


@fleet.command("remove-device")
@click.argument("device")
@data_dir_option
@output_option
@handle_errors
def remove_device(device: str, data_dir: Path, output: str) -> None:
    """Remove DEVICE from this hub's fleet: its bundle no longer logs in.

    \b
      kmsctl fleet remove-device a1
    A running hub reloads within a few seconds and drops the device's bus user. The
    hub's copy of its audit is kept (`kmsctl audit verify --device a1` still reads it).
    Exits 4 (fleet.device_unknown) for a device not in the fleet.
    """
    from mgmt.uplink import remove_device as remove

    remove(data_dir, device)
    if output == "json":
        echo_json({"device": device, "removed": True})
        return
    click.echo(f"Device {device} removed; its audit copy at the hub is kept.")


def register(cli: click.Group) -> None:
    cli.add_command(fleet)
