"""The agent's own client certificate (`[identity]`): the one its client config names,
with which it reaches the KMS. Renewed at its renewal point by itself, over the mutual
TLS connection it authenticates (mgmt.renew.renew_client_config, ClientService.
RenewClient), so a device needs no administrator and no other credential to keep its
identity: once renewed, the old certificate is refused by the broker (auth.superseded).

An identity already expired, revoked or denied cannot renew itself: the device must
enroll again (`kmsctl enroll`); the agent logs the refusal and keeps retrying with
backoff, so a device that is allowed back recovers by itself.
"""

from __future__ import annotations

import hashlib

from cryptography import x509

from agent.certs import CertOutcome
from agent.config import IdentityItem
from agent.files import read_if_regular
from agent.schedule import renewal_time
from edgekms import errors
from mgmt.clientconfig import load_client_config
from mgmt.renew import renew_client_config


def _load(path_text: str, data: bytes | None) -> x509.Certificate:
    try:
        if data is None:
            raise ValueError("missing")
        return x509.load_pem_x509_certificates(data)[0]
    except ValueError:
        raise errors.FailedPrecondition(
            "agent.identity_unreadable",
            f"the client certificate {path_text} is missing or unreadable: enroll first",
            {"path": path_text},
        ) from None


def _outcome(action: str, cert: x509.Certificate, item: IdentityItem) -> CertOutcome:
    nb = cert.not_valid_before_utc.timestamp()
    na = cert.not_valid_after_utc.timestamp()
    return CertOutcome(
        action, f"{cert.serial_number:X}", nb, na, renewal_time(nb, na, item.renew_at)
    )


def keep_identity(item: IdentityItem, now: float, timeout: float) -> CertOutcome:
    """One pass: renew the client certificate if it is due, else report it."""
    config = load_client_config(item.client_config)
    current = _load(str(config.cert), read_if_regular(config.cert))
    outcome = _outcome("unchanged", current, item)
    if now < outcome.due:
        return outcome
    serial = outcome.serial
    # The same request id for the same certificate: a retry after a lost answer gets
    # the certificate the broker already stored (the old one is refused from then on).
    request_id = hashlib.sha256(f"identity\0{serial}".encode()).hexdigest()[:32]
    renewal = renew_client_config(
        item.client_config, rekey=item.rekey, request_id=request_id, timeout=timeout
    )
    cert = x509.load_pem_x509_certificate(renewal.response.certificate_pem.encode())
    return _outcome("rekeyed" if renewal.rekeyed else "renewed", cert, item)
