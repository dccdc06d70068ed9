"""`kmsctl acme`: the mini-CA's ACME server, administered through the broker.

ACME clients (certbot, lego, ...) talk to the CA over HTTPS on their own; these
commands are for the administrator: who has an account, the external account binding
keys that admit new accounts when `eab_required` is set, and the name policy.
"""

from __future__ import annotations

import base64
from pathlib import Path

import click

from edgekms.v1 import ca_pb2
from mgmt.cli.client_access import client_options, open_client
from mgmt.cli.common import CONTEXT_SETTINGS, output_option
from mgmt.cli.output import echo_json, table


@click.group("acme", context_settings=CONTEXT_SETTINGS)
def acme_group() -> None:
    """ACME (RFC 8555): accounts, external account binding keys, the name policy.

    \b
    Serve ACME with `kmsctl up --acme HOST:PORT`; clients use
    https://HOST:PORT/acme/directory with the CA's root in their trust store.
    Examples:
      kmsctl acme policy show              which names ACME may certify
      kmsctl acme accounts list -o json
      kmsctl acme eab create --note "nas certbot"   prints KID and HMAC key, once
    """


def _account(a: ca_pb2.AcmeAccount) -> dict[str, object]:
    return {
        "id": a.id,
        "status": a.status,
        "contact": list(a.contact),
        "key_type": a.key_type,
        "thumbprint": a.thumbprint,
        "created_at": a.created_at,
        "eab_kid": a.eab_kid,
        "requester": f"acme:{a.id}",
    }


def _eab(e: ca_pb2.AcmeEab) -> dict[str, object]:
    return {
        "kid": e.kid,
        "status": e.status,
        "created_at": e.created_at,
        "created_by": e.created_by,
        "account": e.account,
        "note": e.note,
    }


@acme_group.group("accounts", context_settings=CONTEXT_SETTINGS)
def accounts_group() -> None:
    """ACME accounts (one per client key)."""


@accounts_group.command("list")
@output_option
@client_options
def accounts_list(output: str, data_dir: Path, config_path: Path | None) -> None:
    """Every ACME account, a page at a time from the CA. Certificates an account got
    show in `kmsctl cert list` with requester acme:<id>."""
    with open_client(data_dir, config_path) as kms:
        found = list(kms.iter_acme_accounts())
    if output == "json":
        echo_json([_account(a) for a in found])
        return
    rows = [[a.id, a.status, a.key_type, a.created_at, ",".join(a.contact)] for a in found]
    click.echo(table(["ID", "STATUS", "KEY", "CREATED", "CONTACT"], rows))


@acme_group.group("eab", context_settings=CONTEXT_SETTINGS)
def eab_group() -> None:
    """External account binding keys: with `eab_required = true` in the ACME settings,
    only a client holding one (used once) may make an account."""


@eab_group.command("create")
@click.option("--note", default="", help="What the key is for (at most 256 characters).")
@output_option
@client_options
def eab_create(note: str, output: str, data_dir: Path, config_path: Path | None) -> None:
    """Make a key (administrators only). The HMAC key is printed this once and kept only
    by the CA: certbot takes it as --eab-kid KID --eab-hmac-key KEY, lego as --eab
    --kid KID --hmac KEY."""
    with open_client(data_dir, config_path) as kms:
        made = kms.create_acme_eab(note)
    key = base64.urlsafe_b64encode(made.hmac_key).rstrip(b"=").decode()
    if output == "json":
        echo_json(_eab(made.eab) | {"hmac_key": key})
        return
    click.echo(f"kid:      {made.eab.kid}\nhmac key: {key}")


@eab_group.command("list")
@output_option
@client_options
def eab_list(output: str, data_dir: Path, config_path: Path | None) -> None:
    """Every key and its state (valid, used by an account, revoked); never the MAC key."""
    with open_client(data_dir, config_path) as kms:
        keys = [_eab(e) for e in kms.iter_acme_eab()]
    if output == "json":
        echo_json(keys)
        return
    rows = [[str(k[f]) for f in ("kid", "status", "account", "created_at", "note")] for k in keys]
    click.echo(table(["KID", "STATUS", "ACCOUNT", "CREATED", "NOTE"], rows))


@eab_group.command("revoke")
@click.argument("kid")
@output_option
@client_options
def eab_revoke(kid: str, output: str, data_dir: Path, config_path: Path | None) -> None:
    """Revoke an unused key (administrators only); a used one already made its account:
    deactivate that account's certificates with `kmsctl cert revoke` instead."""
    with open_client(data_dir, config_path) as kms:
        done = kms.revoke_acme_eab(kid)
    if output == "json":
        echo_json(_eab(done.eab))
        return
    click.echo(f"{done.eab.kid}: {done.eab.status}")


@acme_group.group("policy", context_settings=CONTEXT_SETTINGS)
def policy_group() -> None:
    """The ACME server's name policy and settings (from the CA's [acme] config)."""


@policy_group.command("show")
@output_option
@client_options
def policy_show(output: str, data_dir: Path, config_path: Path | None) -> None:
    """Which DNS names and IP networks ACME may certify, and where it listens."""
    with open_client(data_dir, config_path) as kms:
        policy = kms.acme_policy()
    value = {
        "enabled": policy.enabled,
        "directory_url": policy.directory_url,
        "dns": list(policy.dns),
        "ip": list(policy.ip),
        "eab_required": policy.eab_required,
        "http01_port": policy.http01_port,
        "tlsalpn01_port": policy.tlsalpn01_port,
        "profile": policy.profile,
    }
    if output == "json":
        echo_json(value)
        return
    if not policy.enabled:
        click.echo("ACME is off: start the stack with `kmsctl up --acme HOST:PORT`")
        return
    for name, shown in value.items():
        text = ", ".join(shown) if isinstance(shown, list) else str(shown)
        click.echo(f"{name + ':':16} {text}")


def register(cli: click.Group) -> None:
    cli.add_command(acme_group)


__all__ = ["acme_group", "register"]
