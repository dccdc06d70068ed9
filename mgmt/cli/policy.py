"""`kmsctl key policy NAME`: show, set or clear who may do what with one key.

    --allow ROLE_OR_CLIENT:OP[,OP...][:ALG[,ALG...]]      one rule; repeatable

A subject that is a role name (admin, operator, signer, enrollee) means that role;
anything else is a client name. Operations: sign, verify, get-public-key (or pubkey),
disable, enable, destroy, attest. Algorithms as `kmsctl key sign --algorithm` spells
them; without any, the rule allows every algorithm the key supports.
"""

from __future__ import annotations

from pathlib import Path

import click

from edgekms.algorithms import ALGORITHM_BY_CLI
from edgekms.errors import InvalidArgument
from edgekms.v1 import common_pb2 as pb
from mgmt.cli.client_access import client_options, open_client
from mgmt.cli.common import output_option
from mgmt.cli.completion import complete_key_names
from mgmt.cli.output import echo_json, policy_to_list

OPERATIONS = {
    "sign": pb.KEY_OPERATION_SIGN,
    "verify": pb.KEY_OPERATION_VERIFY,
    "get-public-key": pb.KEY_OPERATION_GET_PUBLIC_KEY,
    "pubkey": pb.KEY_OPERATION_GET_PUBLIC_KEY,
    "disable": pb.KEY_OPERATION_DISABLE,
    "enable": pb.KEY_OPERATION_ENABLE,
    "destroy": pb.KEY_OPERATION_DESTROY,
    "attest": pb.KEY_OPERATION_ATTEST,
    "encrypt": pb.KEY_OPERATION_ENCRYPT,
    "decrypt": pb.KEY_OPERATION_DECRYPT,
    "generate-data-key": pb.KEY_OPERATION_GENERATE_DATA_KEY,
    "rotate": pb.KEY_OPERATION_ROTATE,
}


def parse_rule(text: str) -> pb.PolicyRule:
    """One --allow value into a PolicyRule; InvalidArgument names what is wrong."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise InvalidArgument(
            "policy.rule_syntax", f"{text!r} is not ROLE_OR_CLIENT:OP[,OP][:ALG,...]"
        )
    # Here, not at the top: edgekms.identity brings cryptography.x509, which every
    # `kmsctl key ...` command would otherwise import.
    from edgekms.identity import CLIENT_NAME_RE, ROLES

    subject, ops_text = parts[0], parts[1]
    rule = pb.PolicyRule()
    if subject in ROLES:
        rule.roles.append(subject)
    elif CLIENT_NAME_RE.match(subject):
        rule.clients.append(subject)
    else:
        raise InvalidArgument(
            "policy.client_invalid", f"{subject!r} is neither a role nor a client"
        )
    for op in ops_text.split(","):
        if op not in OPERATIONS:
            raise InvalidArgument(
                "policy.operation_unknown",
                f"unknown operation {op!r}; one of {', '.join(OPERATIONS)}",
            )
        if OPERATIONS[op] not in rule.operations:
            rule.operations.append(OPERATIONS[op])
    if len(parts) == 3:
        for alg in parts[2].split(","):
            info = ALGORITHM_BY_CLI.get(alg)
            if info is None:
                raise InvalidArgument(
                    "policy.algorithm_unknown",
                    f"unknown algorithm {alg!r}; one of {', '.join(sorted(ALGORITHM_BY_CLI))}",
                )
            rule.algorithms.append(info.algorithm)
    return rule


def describe(policy: pb.KeyPolicy) -> str:
    if not policy.rules:
        return "no policy: the role table decides"
    lines = []
    for rule in policy_to_list(policy):
        who = ",".join([*rule["roles"], *(f"client {c}" for c in rule["clients"])])
        algs = ",".join(rule["algorithms"]) or "any algorithm"
        lines.append(f"allow {who}: {','.join(rule['operations'])} ({algs})")
    return "\n".join(lines)


@click.command("policy")
@click.argument("name", shell_complete=complete_key_names)
@click.option(
    "--allow",
    "allow",
    multiple=True,
    metavar="WHO:OPS[:ALGS]",
    help="A rule, e.g. signer:sign,verify:ecdsa-sha256 or nas-backup:sign. Repeatable; "
    "the given rules replace the key's whole policy.",
)
@click.option("--clear", is_flag=True, help="Remove the policy: the role table decides.")
@output_option
@client_options
def policy_cmd(
    name: str,
    allow: tuple[str, ...],
    clear: bool,
    output: str,
    data_dir: Path,
    config_path: Path | None,
) -> None:
    """Show, set (--allow ...) or clear (--clear) the policy of key NAME.

    \b
    Examples:
      kmsctl key policy web
      kmsctl key policy web --allow signer:sign,verify:ecdsa-sha256 --allow operator:pubkey
      kmsctl key policy web --clear
    """
    if clear and allow:
        raise click.UsageError("--clear and --allow exclude each other")
    with open_client(data_dir, config_path) as kms:
        if clear or allow:
            policy = pb.KeyPolicy(rules=[parse_rule(text) for text in allow])
            key = kms.update_key_policy(name, policy)
        else:
            key = kms.get_key(name)
    if output == "json":
        echo_json({"name": key.name, "policy": policy_to_list(key.policy)})
        return
    click.echo(f"{key.name}: {describe(key.policy)}")


def register(cli: click.Group) -> None:
    key_group = cli.commands.get("key")
    if isinstance(key_group, click.Group):
        key_group.add_command(policy_cmd)
