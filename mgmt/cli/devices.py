"""`kmsctl device list|show|deny|allow`: the registry of enrolled devices and its deny
list. A deny takes effect at the broker at once (the device, or its whole group, is
refused on its next request); its certificates are then revoked batch by batch, with
progress, so a group of thousands does not run into a deadline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgekms.v1 import enroll_pb2
from mgmt.cli.client_access import client_options, open_client
from mgmt.cli.output import echo_json, table


def device_to_dict(device: enroll_pb2.Device) -> dict[str, Any]:
    """The stable json shape of a device."""
    return {
        "name": device.name,
        "group": device.group,
        "profile": device.profile,
        "status": enroll_pb2.DeviceStatus.Name(device.status)
        .removeprefix("DEVICE_STATUS_")
        .lower(),
        "serial": device.serial,
        "enrolled_at": device.enrolled_at,
        "token_id": device.token_id,
        "sans": list(device.sans),
        "denied_at": device.denied_at,
        "denied_by": device.denied_by,
        "ek_sha256": device.ek_sha256.hex(),
    }


_OUTPUT = click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")


@click.group("device")
def device_group() -> None:
    """Enrolled devices: list, show, deny and allow (one device or a --group).

    \b
      kmsctl device list --group sensors
      kmsctl device show sensor-7 -o json
      kmsctl device deny sensor-7            # or: --group sensors
      kmsctl device allow --group sensors
    """


@device_group.command("list")
@click.option("--group", default="", help="Only this group's devices.")
@click.option("--denied", is_flag=True, help="Only denied devices.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many.")
@_OUTPUT
@client_options
def list_cmd(
    group: str,
    denied: bool,
    limit: int | None,
    output: str,
    data_dir: Path,
    config_path: Path | None,
) -> None:
    """Devices by name, fetched a page at a time (fine with 50,000)."""
    import itertools

    with open_client(data_dir, config_path) as kms:
        devices = [
            device_to_dict(d)
            for d in itertools.islice(kms.iter_devices(group=group, denied_only=denied), limit)
        ]
    if output == "json":
        echo_json(devices)
        return
    rows = [(d["name"], d["group"], d["status"], d["enrolled_at"], d["serial"]) for d in devices]
    click.echo(table(("NAME", "GROUP", "STATUS", "ENROLLED", "SERIAL"), rows))


@device_group.command("show")
@click.argument("name")
@_OUTPUT
@client_options
def show_cmd(name: str, output: str, data_dir: Path, config_path: Path | None) -> None:
    """One device's record."""
    with open_client(data_dir, config_path) as kms:
        device = device_to_dict(kms.get_device(name))
    if output == "json":
        echo_json(device)
        return
    for key, value in device.items():
        if value not in ("", []):
            click.echo(f"{key + ':':<13} {value}")


@device_group.command("deny")
@click.argument("name", required=False, default="")
@click.option("--group", default="", help="Deny every device of this group instead.")
@click.option("--batch", type=click.IntRange(1, 1000), default=200, show_default=True)
@_OUTPUT
@client_options
def deny_cmd(
    name: str, group: str, batch: int, output: str, data_dir: Path, config_path: Path | None
) -> None:
    """Deny NAME (or --group): refused by the broker at once, every certificate it holds
    revoked (its client certificate and the mini-CA certificates it asked for), and it
    cannot enroll again or renew. Progress goes to stderr."""
    if bool(name) == bool(group):
        raise click.UsageError("give exactly one of NAME and --group")

    def progress(answer: enroll_pb2.DenyDevicesResponse) -> None:
        if output != "json" and answer.devices_total > batch:
            click.echo(
                f"  {answer.next_cursor or 'done'}: {answer.devices_denied} more denied "
                f"of {answer.devices_total}",
                err=True,
            )

    with open_client(data_dir, config_path) as kms:
        total = kms.deny_devices(name=name, group=group, batch=batch, progress=progress)
    if output == "json":
        echo_json(
            {
                "devices_denied": total.devices_denied,
                "certificates_revoked": total.certificates_revoked,
                "devices_total": total.devices_total,
            }
        )
        return
    click.echo(
        f"denied {total.devices_denied} device(s); {total.certificates_revoked} "
        "certificate(s) revoked"
    )


@device_group.command("allow")
@click.argument("name", required=False, default="")
@click.option("--group", default="", help="Lift the deny of this group.")
@_OUTPUT
@client_options
def allow_cmd(name: str, group: str, output: str, data_dir: Path, config_path: Path | None) -> None:
    """Lift a deny. Revoked certificates stay revoked: the device enrolls again with a
    new token."""
    if bool(name) == bool(group):
        raise click.UsageError("give exactly one of NAME and --group")
    with open_client(data_dir, config_path) as kms:
        answer = kms.allow_devices(name=name, group=group)
    if output == "json":
        echo_json({"devices_allowed": answer.devices_allowed})
        return
    click.echo(f"allowed {answer.devices_allowed} device(s); they enroll again with a new token")


def register(cli: click.Group) -> None:
    cli.add_command(device_group)
