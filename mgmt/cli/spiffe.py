"""`kmsctl spiffe`: the SPIFFE trust domain, its registration entries, its bundle, and
the device-side Workload API agent (`kmsctl spiffe agent`, package spiffe_agent).

Entries are checked here (SPIFFE ID, selectors, TTL) before they are sent, so a typo is
a usage-level refusal with the same reason the CA would give (edgekms.spiffe)."""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from edgekms import spiffe as sp
from edgekms.errors import InvalidArgument
from edgekms.v1 import ca_pb2
from mgmt.cli.client_access import client_options, open_client
from mgmt.cli.common import CONTEXT_SETTINGS
from mgmt.cli.output import echo_json, handle_errors, table

_OUTPUT = click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")


def entry_to_dict(entry: ca_pb2.SpiffeEntry) -> dict[str, Any]:
    """The stable json shape of a registration entry."""
    return {
        "entry_id": entry.entry_id,
        "spiffe_id": entry.spiffe_id,
        "node": entry.node,
        "selectors": list(entry.selectors),
        "ttl_seconds": entry.ttl_seconds,
        "jwt_ttl_seconds": entry.jwt_ttl_seconds,
        "created_at": entry.created_at,
        "created_by": entry.created_by,
    }


def _ttl(text: str | None, what: str) -> int:
    if not text:
        return 0
    return sp.check_ttl(sp.parse_seconds(text), what)


@click.group("spiffe", context_settings=CONTEXT_SETTINGS)
def spiffe_group() -> None:
    """SPIFFE workload identity: trust domain, registration entries, Workload API agent.

    \b
      kmsctl spiffe init --trust-domain home.arpa
      kmsctl spiffe entry create --id spiffe://home.arpa/backup --node nas \\
          --selector unix:uid:1000 --selector unix:path:/usr/bin/restic --ttl 30m
      kmsctl spiffe entry list --node nas -o json
      kmsctl spiffe bundle -o json
      kmsctl spiffe federate --trust-domain other.example --bundle-url https://spire.other/bundle
      kmsctl spiffe unfederate --trust-domain other.example
      kmsctl spiffe rotate --key jwt
      kmsctl spiffe agent --client-config /var/lib/edgekms/device/config.toml   (on the device)

    Selectors: unix:uid:N, unix:gid:N, unix:path:/abs/exe, unix:sha256:HEX (of the
    executable), systemd:unit:NAME.service. A workload gets an entry's SPIFFE ID when
    every selector of the entry matches it. Details: docs/spiffe.md.
    """


@spiffe_group.command("init")
@click.option("--trust-domain", required=True, help="e.g. home.arpa (lower case, no port).")
@click.option(
    "--ca-days", type=click.IntRange(1, 3650), default=365, show_default=True,
    help="Lifetime of the SPIFFE signing CA (under the mini-CA's root).",
)  # fmt: skip
@_OUTPUT
@client_options
def init_cmd(
    trust_domain: str, ca_days: int, output: str, data_dir: Path, config_path: Path | None
) -> None:
    """Make the trust domain: a SPIFFE signing CA under the root and an ES256 JWT key,
    both generated in the token. Needs `kmsctl ca init` first, the root key enabled,
    and the admin role. Exit 5 if a trust domain exists."""
    sp.check_trust_domain(trust_domain)
    with open_client(data_dir, config_path) as kms:
        answer = kms.spiffe_init(trust_domain, ca_validity_days=ca_days)
    if output == "json":
        echo_json(
            {
                "trust_domain": answer.trust_domain,
                "jwt_kid": answer.jwt_kid,
                "ca_certificate_der_b64": base64.b64encode(answer.ca_certificate_der).decode(),
            }
        )
        return
    click.echo(f"trust domain {answer.trust_domain}: signing CA and JWT key in the token")


@spiffe_group.command("bundle")
@click.option(
    "--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="Write the X.509 authorities (PEM) to this file instead of stdout.",
)  # fmt: skip
@_OUTPUT
@client_options
def bundle_cmd(
    out_path: Path | None, output: str, data_dir: Path, config_path: Path | None
) -> None:
    """The trust domain's bundle: X.509 authorities (PEM) and the JWT keys (JWKS)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    with open_client(data_dir, config_path) as kms:
        bundle = kms.spiffe_bundle()
    pems = [
        x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()
        for der in bundle.x509_authorities_der
    ]
    if output == "json":
        echo_json(
            {
                "trust_domain": bundle.trust_domain,
                "sequence": bundle.sequence,
                "x509_authorities_pem": pems,
                "jwks": json.loads(bundle.jwks),
            }
        )
        return
    if out_path is not None:
        out_path.write_text("".join(pems))
        click.echo(f"wrote {len(pems)} authority certificate(s) to {out_path}", err=True)
        return
    click.echo("".join(pems), nl=False)


@spiffe_group.command("federate")
@click.option("--trust-domain", required=True, help="The foreign trust domain, e.g. other.example.")
@click.option("--bundle-url", required=True, help="Its bundle endpoint, https://...")
@click.option(
    "--endpoint-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
    help="https_web: PEM CA that authenticates the endpoint's TLS (default: the system's "
    "roots).",
)  # fmt: skip
@click.option(
    "--endpoint-spiffe-id", default=None,
    help="https_spiffe: the SPIFFE ID of the endpoint's X509-SVID, in the federated domain "
    "(a SPIRE server: spiffe://DOMAIN/spire/server). Needs --bundle.",
)  # fmt: skip
@click.option(
    "--bundle", "bundle_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="https_spiffe: the domain's current bundle, given out of band once (SPIFFE bundle "
    "JSON as `spire-server bundle show -format spiffe` prints it, or PEM certificates).",
)  # fmt: skip
@_OUTPUT
@client_options
def federate_cmd(
    trust_domain: str,
    bundle_url: str,
    endpoint_ca: Path | None,
    endpoint_spiffe_id: str | None,
    bundle_path: Path | None,
    output: str,
    data_dir: Path,
    config_path: Path | None,
) -> None:
    """Trust another trust domain: read its bundle from its bundle endpoint now (exit 6
    if it cannot be read or authenticated, nothing stored) and at its refresh hint
    after; workloads get it as a federated bundle. Administrators only; again to change
    the URL or the profile.

    \b
    Two endpoint profiles (SPIFFE Federation specification):
      https_web     the endpoint's certificate is checked against --endpoint-ca (or the
                    system's roots) and the URL's host name:
        kmsctl spiffe federate --trust-domain other.example \\
            --bundle-url https://spire.other.example/bundle --endpoint-ca ca.pem
      https_spiffe  the endpoint presents an X509-SVID whose URI SAN must be
                    --endpoint-spiffe-id, checked against the domain's bundle: --bundle
                    the first time, then each bundle read authenticates the next read
                    (no host name check, no public CA; SPIRE's usual choice):
        kmsctl spiffe federate --trust-domain other.example \\
            --bundle-url https://spire.other.example:8443 \\
            --endpoint-spiffe-id spiffe://other.example/spire/server \\
            --bundle other.example.bundle.json

    --endpoint-ca and --endpoint-spiffe-id/--bundle exclude each other (exit 3)."""
    sp.check_trust_domain(trust_domain)
    if endpoint_ca is not None and (endpoint_spiffe_id is not None or bundle_path is not None):
        raise InvalidArgument(
            "spiffe.endpoint_profile_conflict",
            "--endpoint-ca (https_web) and --endpoint-spiffe-id/--bundle (https_spiffe) "
            "exclude each other",
        )
    if (endpoint_spiffe_id is None) != (bundle_path is None):
        raise click.UsageError("--endpoint-spiffe-id and --bundle go together (https_spiffe)")
    ca_pem = endpoint_ca.read_bytes() if endpoint_ca else b""
    bootstrap = bundle_path.read_bytes() if bundle_path else b""
    with open_client(data_dir, config_path) as kms:
        federation = kms.spiffe_federate(
            trust_domain, bundle_url, ca_pem, endpoint_spiffe_id or "", bootstrap
        )
    if output == "json":
        echo_json(
            {
                "trust_domain": federation.trust_domain,
                "bundle_url": federation.bundle_url,
                "endpoint_profile": federation.endpoint_profile,
                "endpoint_spiffe_id": federation.endpoint_spiffe_id,
                "x509_authorities": len(federation.x509_authorities_der),
                "jwt_keys": len(json.loads(federation.jwks).get("keys", [])),
                "sequence": federation.sequence,
                "refresh_hint_seconds": federation.refresh_hint_seconds,
            }
        )
        return
    click.echo(
        f"federated with {federation.trust_domain} ({federation.endpoint_profile}): "
        f"{len(federation.x509_authorities_der)} X.509 authorities, sequence "
        f"{federation.sequence}"
    )


@spiffe_group.command("unfederate")
@click.option("--trust-domain", required=True, help="The foreign trust domain to stop trusting.")
@_OUTPUT
@client_options
def unfederate_cmd(
    trust_domain: str, output: str, data_dir: Path, config_path: Path | None
) -> None:
    """Stop trusting a foreign trust domain: its bundle leaves the workloads' streams at
    the agents' next sync (--sync-interval). Administrators only; exit 4 if this KMS is
    not federated with it."""
    sp.check_trust_domain(trust_domain)
    with open_client(data_dir, config_path) as kms:
        gone = kms.spiffe_unfederate(trust_domain)
    if output == "json":
        echo_json({"trust_domain": gone.trust_domain, "bundle_url": gone.bundle_url})
        return
    click.echo(f"no longer federated with {gone.trust_domain}")


@spiffe_group.command("rotate")
@click.option(
    "--key", "which", type=click.Choice(["all", "x509", "jwt"]), default="all",
    show_default=True, help="The X.509 signing CA, the JWT-SVID key, or both.",
)  # fmt: skip
@click.option(
    "--overlap", default=None,
    help="How long the old key stays trusted (90s, 2h, 7d; 0s drops it at once, for a "
    "compromised key). Default: the longest TTL of any entry plus a minute.",
)  # fmt: skip
@click.option(
    "--ca-days", type=click.IntRange(1, 3650), default=365, show_default=True,
    help="Lifetime of the new SPIFFE signing CA.",
)  # fmt: skip
@_OUTPUT
@client_options
def rotate_cmd(
    which: str,
    overlap: str | None,
    ca_days: int,
    output: str,
    data_dir: Path,
    config_path: Path | None,
) -> None:
    """Make new SPIFFE keys in the token and retire the old ones.

    \b
    The JWKS of the bundle carries the old JWT key next to the new one until the
    JWT-SVIDs it signed have expired (the overlap), then drops it. X.509-SVIDs chain to
    the mini-CA's root, which stays; agents renew at once the SVIDs the old CA signed.
    Administrators only; nothing changes if it fails (exit 6 with the root key disabled).
    """
    overlap_s = sp.parse_seconds(overlap) if overlap is not None else None
    with open_client(data_dir, config_path) as kms:
        answer = kms.spiffe_rotate(
            x509=which in ("all", "x509"),
            jwt=which in ("all", "jwt"),
            overlap_seconds=overlap_s,
            ca_validity_days=ca_days,
        )
    retired = [
        {"kind": "jwt" if r.jwt else "x509", "key": r.key_label, "drop_at": r.drop_at}
        for r in answer.retired
    ]
    if output == "json":
        echo_json({"generation": answer.generation, "jwt_kid": answer.jwt_kid, "retired": retired})
        return
    for r in retired:
        click.echo(f"retired {r['kind']} key {r['key']}: trusted until {r['drop_at']}")
    click.echo(f"generation {answer.generation} in use")


@spiffe_group.group("entry")
def entry_group() -> None:
    """Registration entries: which workloads on which device get which SPIFFE ID."""


@entry_group.command("create")
@click.option("--id", "spiffe_id", required=True, help="spiffe://TRUST-DOMAIN/path")
@click.option("--node", required=True, help="The enrolled device whose agent serves it.")
@click.option(
    "--selector", "selectors", multiple=True, required=True,
    help="type:key:value; repeat: all must match (unix:uid:1000, systemd:unit:x.service).",
)  # fmt: skip
@click.option("--ttl", default=None, help="X.509-SVID lifetime, 10s..7d (30m, 1h; default 1h).")
@click.option("--jwt-ttl", default=None, help="JWT-SVID lifetime (default 5m).")
@_OUTPUT
@client_options
def entry_create_cmd(
    spiffe_id: str,
    node: str,
    selectors: tuple[str, ...],
    ttl: str | None,
    jwt_ttl: str | None,
    output: str,
    data_dir: Path,
    config_path: Path | None,
) -> None:
    """Register a workload. Exit 3 for a malformed ID, selector or TTL, 5 if the node
    has an entry for that ID already."""
    sp.parse_id(spiffe_id, require_path=True)
    sp.check_node(node)
    checked = sp.check_selectors(list(selectors))
    ttl_s, jwt_ttl_s = _ttl(ttl, "ttl"), _ttl(jwt_ttl, "JWT ttl")
    with open_client(data_dir, config_path) as kms:
        entry = kms.spiffe_create_entry(
            spiffe_id, node, checked, ttl_seconds=ttl_s, jwt_ttl_seconds=jwt_ttl_s
        )
    if output == "json":
        echo_json(entry_to_dict(entry))
        return
    click.echo(f"entry {entry.entry_id}: {entry.spiffe_id} on {entry.node}")


@entry_group.command("list")
@click.option("--node", default="", help="Only this device's entries.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many.")
@_OUTPUT
@client_options
def entry_list_cmd(
    node: str, limit: int | None, output: str, data_dir: Path, config_path: Path | None
) -> None:
    """Entries by node, fetched a page at a time."""
    import itertools

    if node:
        sp.check_node(node)
    with open_client(data_dir, config_path) as kms:
        entries = [entry_to_dict(e) for e in itertools.islice(kms.spiffe_iter_entries(node), limit)]
    if output == "json":
        echo_json(entries)
        return
    rows = [
        (e["entry_id"], e["spiffe_id"], e["node"], ",".join(e["selectors"]), e["ttl_seconds"])
        for e in entries
    ]
    click.echo(table(("ENTRY", "SPIFFE ID", "NODE", "SELECTORS", "TTL"), rows))


@entry_group.command("show")
@click.argument("entry_id")
@_OUTPUT
@client_options
def entry_show_cmd(entry_id: str, output: str, data_dir: Path, config_path: Path | None) -> None:
    """One entry, by the id `entry create` printed."""
    with open_client(data_dir, config_path) as kms:
        entry = entry_to_dict(kms.spiffe_get_entry(entry_id))
    if output == "json":
        echo_json(entry)
        return
    for key, value in entry.items():
        click.echo(f"{key + ':':<16} {value}")


@entry_group.command("delete")
@click.argument("entry_id")
@_OUTPUT
@client_options
def entry_delete_cmd(entry_id: str, output: str, data_dir: Path, config_path: Path | None) -> None:
    """Remove an entry: its workloads get no new SVID (the current one runs out)."""
    with open_client(data_dir, config_path) as kms:
        entry = kms.spiffe_delete_entry(entry_id)
    if output == "json":
        echo_json(entry_to_dict(entry))
        return
    click.echo(f"deleted entry {entry.entry_id} ({entry.spiffe_id} on {entry.node})")


@spiffe_group.command("agent", context_settings=CONTEXT_SETTINGS)
@click.option(
    "--client-config", type=click.Path(dir_okay=False, path_type=Path), required=True,
    envvar="EDGEKMS_CONFIG", help="The device's own client config (kmsctl enroll --out-dir).",
)  # fmt: skip
@click.option(
    "--socket", "socket_path", default=None, envvar="SPIFFE_ENDPOINT_SOCKET",
    help="unix:///run/edgekms/workload.sock by default.",
)  # fmt: skip
@click.option(
    "--sync-interval", type=click.FloatRange(0.2, 3600), default=30.0, show_default=True,
    help="Seconds between reads of this device's entries and the bundle.",
)  # fmt: skip
@click.option(
    "--log-level", default="info", show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)  # fmt: skip
@handle_errors
def agent_cmd(
    client_config: Path, socket_path: str | None, sync_interval: float, log_level: str
) -> None:
    """Serve the SPIFFE Workload API to the programs on this device.

    Listens on a Unix socket (mode 0666 in a 0755 directory: who is asking comes from
    the kernel, SO_PEERCRED), attests each caller (uid, gid, executable path and
    SHA-256, systemd unit), and hands it the X.509- and JWT-SVIDs of the entries it
    matches, with keys made here; rotates them at half their lifetime. Logs are JSON
    lines on stderr; SIGTERM stops.
    """
    argv = [sys.executable, "-m", "spiffe_agent", "--client-config", str(client_config)]
    if socket_path:
        argv += ["--socket", socket_path]
    argv += ["--sync-interval", str(sync_interval), "--log-level", log_level.lower()]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


def register(cli: click.Group) -> None:
    cli.add_command(spiffe_group)
