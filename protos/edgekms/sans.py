"""Subject alternative names as "kind:value" strings (`dns:nas.home.arpa`, `ip:10.0.0.1`,
`email:...`, `uri:...`): one spelling for records, logs, comparisons and admission checks.

The callers differ on purpose, so the differences are parameters, not copies:

* the CA's records keep DNS names as written and show any other type as `other:<repr>`;
* the agent compares a certificate's four known kinds with its config and drops the rest;
* the broker's admission checks (enrollment, a device's own certificates) lower-case DNS
  names and give only `dns:` and `ip:` their kind, so an email, URI or any other type can
  never equal a recorded name: everything else is tagged `other:<value>` (enrollment) or
  `<TypeName>:<value>` (device certificates).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from cryptography import x509

# Every kind a string can carry, and the subset the broker's admission checks know.
ALL_KINDS: frozenset[str] = frozenset({"dns", "ip", "email", "uri"})
ADDRESS_KINDS: frozenset[str] = frozenset({"dns", "ip"})

_KIND_OF: dict[type[x509.GeneralName], str] = {
    x509.DNSName: "dns",
    x509.IPAddress: "ip",
    x509.RFC822Name: "email",
    x509.UniformResourceIdentifier: "uri",
}

# How a name whose kind is not spelled out is written; None drops it.
OtherSpelling = Callable[[x509.GeneralName], "str | None"]


def other_repr(name: x509.GeneralName) -> str:
    """`other:<repr>`: the CA's records (nothing is lost, nothing can be mistaken)."""
    return f"other:{name!r}"


def other_value(name: x509.GeneralName) -> str:
    """`other:<value>`: the enrollment admission check."""
    return f"other:{name.value}"


def type_and_value(name: x509.GeneralName) -> str:
    """`<TypeName>:<value>`: the device-certificate admission check."""
    return f"{type(name).__name__}:{name.value}"


def dropped(name: x509.GeneralName) -> None:
    """Leave the name out (the agent compares only what its config can say)."""
    return None


def san_strings(
    names: Iterable[x509.GeneralName],
    *,
    kinds: frozenset[str] = ALL_KINDS,
    lower_dns: bool = False,
    other: OtherSpelling = other_repr,
) -> list[str]:
    """Each name as "kind:value" if its kind is in `kinds`, else as `other` spells it
    (or not at all when that returns None); DNS names lower-cased if `lower_dns`."""
    out: list[str] = []
    for name in names:
        kind = _KIND_OF.get(type(name))
        if kind is None or kind not in kinds:
            spelled = other(name)
            if spelled is not None:
                out.append(spelled)
        elif kind == "dns" and lower_dns:
            out.append(f"dns:{str(name.value).lower()}")
        else:
            out.append(f"{kind}:{name.value}")
    return out


__all__ = [
    "ADDRESS_KINDS",
    "ALL_KINDS",
    "dropped",
    "other_repr",
    "other_value",
    "san_strings",
    "type_and_value",
]
