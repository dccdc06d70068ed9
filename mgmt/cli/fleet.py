"""`kmsctl fleet`: a hub's devices, each a leaf node with its own stack (mgmt.uplink)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from mgmt.cli.common import data_dir_option, output_option
from mgmt.cli.output import echo_json, handle_errors, table

if TYPE_CHECKING:
    from mgmt.uplink import DeviceRecord


@click.group()
def fleet() -> None:
    """A fleet hub's devices: uplink bundles, names for the hub's CA, list, remove."""


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
    "--name",
    "names",
    multiple=True,
    metavar="dns:NAME|ip:ADDRESS",
    help="A name the device may have certified by the hub's CA (repeat; at most 64). "
    "Without any, the device gets no certificate from the hub.",
)
@click.option(
    "--profile",
    "profiles",
    multiple=True,
    type=click.Choice(["https-server", "vpn-server", "vpn-client"]),
    help="A CA profile the device may ask for (repeat; default https-server once it has names).",
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
    names: tuple[str, ...],
    profiles: tuple[str, ...],
    out: Path,
    output: str,
) -> None:
    """Add DEVICE (a-z 0-9 -) to this hub's fleet and write its uplink bundle.

    \b
    Run on the hub, with the hub's data dir. The bundle holds the device's id, the hub's
    leaf address, the device's hub password and the CA of the hub's leaf certificate:
      kmsctl fleet add-device a1 --hub hub.lan:7422 --name dns:a1.lan \\
          --out uplink-a1.toml
      kmsctl up --uplink uplink-a1.toml          (on the device)
    The device's clients then ask its own broker for certificates as usual
    (`kmsctl cert issue`); its broker gets them from this hub's CA, for the names
    given here only (change them with `kmsctl fleet allow`).
    A hub already running (`kmsctl up --leaf-listen`) takes the new device within a few
    seconds: it reloads nats-server (SIGHUP) with the device's bus user and makes the
    hub's copy of its audit (KMS_FLEET_<ID>). Adding it again writes a new bundle with the
    same password. Nothing secret is printed.
    """
    from mgmt.uplink import add_device as add
    from mgmt.uplink import make_bundle, write_bundle

    record, password, tls = add(
        data_dir, device, hub_address, providers, names or None, profiles or None
    )
    write_bundle(make_bundle(device, hub_address, password, tls), out)
    if output == "json":
        echo_json({**_record_json(record), "bundle": str(out)})
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
        echo_json([_record_json(r) for r in devices])
        return
    if not devices:
        click.echo("No devices.")
        return
    click.echo(
        table(
            ["DEVICE", "NAMES", "PROFILES", "WRITERS"],
            [
                [
                    r.device,
                    ",".join(r.names) or "-",
                    ",".join(r.profiles) or "-",
                    ",".join(r.writers),
                ]
                for r in devices
            ],
        )
    )


def _record_json(record: DeviceRecord) -> dict[str, object]:
    return {
        "device": record.device,
        "writers": list(record.writers),
        "names": list(record.names),
        "profiles": list(record.profiles),
    }


@fleet.command("allow")
@click.argument("device")
@data_dir_option
@click.option(
    "--name",
    "names",
    multiple=True,
    metavar="dns:NAME|ip:ADDRESS",
    help="A name the device may have certified (repeat). The list replaces the old one.",
)
@click.option("--no-names", is_flag=True, help="Take every name away: no certificates.")
@click.option(
    "--profile",
    "profiles",
    multiple=True,
    type=click.Choice(["https-server", "vpn-server", "vpn-client"]),
    help="A CA profile the device may ask for (repeat; replaces the old list; "
    "without it the old list stays).",
)
@output_option
@handle_errors
def allow(
    device: str,
    data_dir: Path,
    names: tuple[str, ...],
    no_names: bool,
    profiles: tuple[str, ...],
    output: str,
) -> None:
    """Set what DEVICE may ask this hub's CA for: its names and profiles.

    \b
      kmsctl fleet allow a1 --name dns:a1.lan --name ip:192.168.1.20
      kmsctl fleet allow a1 --profile https-server --profile vpn-client
      kmsctl fleet allow a1 --no-names
    A running hub writes its device registry within a few seconds; from then on the
    CA refuses names no longer listed. Certificates already issued stay valid: revoke
    them with `kmsctl cert revoke`. Exits 4 (fleet.device_unknown) for a device not in
    the fleet, 3 for a name that is not dns:NAME or ip:ADDRESS.
    """
    from mgmt.uplink import set_allowed

    if no_names and names:
        raise click.UsageError("--name and --no-names: give one or the other")
    if not (names or no_names or profiles):
        raise click.UsageError("nothing to change: give --name, --no-names or --profile")
    record = set_allowed(data_dir, device, () if no_names else (names or None), profiles or None)
    if output == "json":
        echo_json(_record_json(record))
        return
    shown = ", ".join(record.names) or "no names"
    click.echo(f"Device {device} may ask for {shown} ({', '.join(record.profiles) or '-'}).")


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
