"""How kmsctl talks back: one-line errors with stable exit codes, json for scripts,
tables for people, and progress on stderr for the slow operations.

Scripts match on the exit code and on the `reason` in `kmsctl: <reason>: <message>`;
both are stable. The json field names are stable too (see key_to_dict).
"""

from __future__ import annotations

import functools
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn, ParamSpec, TypeVar

import click

from edgekms import errors
from edgekms.algorithms import ALGORITHMS, KEY_TYPES, key_usage
from edgekms.v1 import common_pb2, keys_pb2
from mgmt.cli.common import ExitCode

P = ParamSpec("P")
R = TypeVar("R")

_EXIT_BY_ERROR: dict[type[errors.KMSError], ExitCode] = {
    errors.InvalidArgument: ExitCode.INVALID_ARGUMENT,
    errors.NotFound: ExitCode.NOT_FOUND,
    errors.AlreadyExists: ExitCode.ALREADY_EXISTS,
    errors.FailedPrecondition: ExitCode.FAILED_PRECONDITION,
    errors.PermissionDenied: ExitCode.PERMISSION_DENIED,
    errors.Unauthenticated: ExitCode.PERMISSION_DENIED,
    errors.Unavailable: ExitCode.UNAVAILABLE,
    errors.DeadlineExceeded: ExitCode.UNAVAILABLE,
    errors.ResourceExhausted: ExitCode.UNAVAILABLE,
    errors.Internal: ExitCode.INTERNAL,
}


def exit_code_for(exc: errors.KMSError) -> ExitCode:
    """The exit code of an error's class; unknown subclasses count as INTERNAL."""
    for cls in type(exc).__mro__:
        if cls in _EXIT_BY_ERROR:
            return _EXIT_BY_ERROR[cls]  # type: ignore[index]
    return ExitCode.INTERNAL


def error_line(exc: errors.KMSError) -> str:
    """One line, `kmsctl: <reason>: <message>`, newlines folded so grep sees one record."""
    message = " ".join(exc.message.split())
    return f"kmsctl: {exc.reason}: {message}"


def fail(exc: errors.KMSError) -> NoReturn:
    """Report `exc` on stderr and leave with its exit code."""
    click.echo(error_line(exc), err=True)
    sys.exit(int(exit_code_for(exc)))


def handle_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn KMSError raised by a command into the one-line report and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except errors.KMSError as exc:
            fail(exc)

    return wrapper


# -- rendering --------------------------------------------------------------------------


def key_type_name(key_type: common_pb2.KeyType.ValueType) -> str:
    info = KEY_TYPES.get(key_type)
    return info.cli_name if info else "unspecified"


def algorithm_name(algorithm: common_pb2.SignatureAlgorithm.ValueType) -> str:
    info = ALGORITHMS.get(algorithm)
    return info.cli_name if info else "unspecified"


def state_name(state: common_pb2.KeyState.ValueType) -> str:
    """ "active", "disabled", ...: the enum name without its prefix, lower-case."""
    if state not in common_pb2.KeyState.values():
        return f"unknown-{int(state)}"
    return common_pb2.KeyState.Name(state).removeprefix("KEY_STATE_").lower()


def operation_name(op: common_pb2.KeyOperation.ValueType) -> str:
    """ "sign", "verify", ...; a number this kmsctl does not know (a newer broker, or a
    record stored before the broker checked) prints as "unknown-N" rather than crashing
    every listing."""
    if op not in common_pb2.KeyOperation.values():
        return f"unknown-{int(op)}"
    return common_pb2.KeyOperation.Name(op).removeprefix("KEY_OPERATION_").lower()


def policy_to_list(policy: common_pb2.KeyPolicy) -> list[dict[str, Any]]:
    return [
        {
            "roles": list(rule.roles),
            "clients": list(rule.clients),
            "operations": [operation_name(op) for op in rule.operations],
            "algorithms": [algorithm_name(a) for a in rule.algorithms],
        }
        for rule in policy.rules
    ]


def key_to_dict(key: keys_pb2.Key) -> dict[str, Any]:
    """The stable json shape of a key record."""
    return {
        "name": key.name,
        "provider": key.provider,
        "type": key_type_name(key.key_type),
        "state": state_name(key.state),
        "key_id": key.key_id,
        "created_at": key.created_at,
        "updated_at": key.updated_at,
        "created_by": key.created_by,
        "labels": dict(sorted(key.labels.items())),
        "policy": policy_to_list(key.policy),
        "options": {
            "pcr_indexes": list(key.options.pcr_indexes),
            "require_auth": key.options.require_auth,
        },
        "usage": usage_name(key.key_type, key.options.usage),
        "version": key.version or 1,
    }


def usage_name(key_type: common_pb2.KeyType.ValueType, usage: common_pb2.KeyUsage.ValueType) -> str:
    """ "sign" or "encrypt": what the key is for (its type's default when unset)."""
    effective = key_usage(key_type, usage)
    return "encrypt" if effective == common_pb2.KEY_USAGE_ENCRYPT_DECRYPT else "sign"


def encryption_algorithm_name(algorithm: common_pb2.EncryptionAlgorithm.ValueType) -> str:
    if algorithm not in common_pb2.EncryptionAlgorithm.values():
        return f"unknown-{int(algorithm)}"
    name = common_pb2.EncryptionAlgorithm.Name(algorithm)
    return name.removeprefix("ENCRYPTION_ALGORITHM_").lower().replace("_", "-")


def openssl_serial(serial: str | int) -> str:
    """A serial number as `openssl x509 -serial` prints it: upper-case hex in whole
    bytes, so a leading zero is kept ("0A1B", not "A1B") and it matches what people
    copy from openssl. Accepts the CA's canonical hex or an int."""
    value = int(serial, 16) if isinstance(serial, str) else serial
    digits = f"{value:X}"
    return digits.rjust(len(digits) + len(digits) % 2, "0")


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=False))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the last column is not padded."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in (headers, *rows):
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def key_table(keys: Sequence[keys_pb2.Key]) -> str:
    rows = [
        [k.name, key_type_name(k.key_type), k.provider, state_name(k.state), k.created_at]
        for k in keys
    ]
    return table(["NAME", "TYPE", "PROVIDER", "STATE", "CREATED"], rows)


def key_details(key: keys_pb2.Key) -> str:
    """`key show` for people: one field a line, labels and policy rules indented."""
    d = key_to_dict(key)
    lines = [
        f"name:        {d['name']}",
        f"type:        {d['type']}",
        f"provider:    {d['provider']}",
        f"state:       {d['state']}",
        f"key_id:      {d['key_id']}",
        f"created_at:  {d['created_at']}",
        f"updated_at:  {d['updated_at']}",
        f"created_by:  {d['created_by']}",
        f"usage:       {d['usage']}",
        f"version:     {d['version']}",
    ]
    if d["labels"]:
        lines.append("labels:")
        lines.extend(f"  {k}={v}" for k, v in d["labels"].items())
    if d["policy"]:
        lines.append("policy:")
        for rule in d["policy"]:
            who = ",".join([*(f"role:{r}" for r in rule["roles"]), *rule["clients"]]) or "-"
            ops = ",".join(rule["operations"]) or "-"
            algs = ",".join(rule["algorithms"]) or "any"
            lines.append(f"  {who} may {ops} (algorithms: {algs})")
    if d["options"]["pcr_indexes"] or d["options"]["require_auth"]:
        pcrs = ",".join(str(i) for i in d["options"]["pcr_indexes"]) or "-"
        lines.append(f"options:     pcrs={pcrs} require_auth={d['options']['require_auth']}")
    return "\n".join(lines)


# -- progress ---------------------------------------------------------------------------

_SPINNER = "|/-\\"


@contextmanager
def progress(message: str, *, interval: float = 0.1) -> Iterator[None]:
    """Show that a slow operation is alive: a spinner with elapsed seconds on a terminal,
    one line otherwise (logs and pipes want no carriage returns)."""
    stream = sys.stderr
    if not stream.isatty():
        click.echo(f"{message} ...", err=True)
        yield
        return
    stop = threading.Event()
    started = time.monotonic()

    def spin() -> None:
        i = 0
        while not stop.wait(interval):
            elapsed = time.monotonic() - started
            stream.write(f"\r{_SPINNER[i % len(_SPINNER)]} {message} {elapsed:4.1f}s")
            stream.flush()
            i += 1

    thread = threading.Thread(target=spin, name="kmsctl-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        elapsed = time.monotonic() - started
        stream.write(f"\r{message} ({elapsed:.1f}s)\n")
        stream.flush()
