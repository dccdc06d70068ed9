"""Taking ownership of a TPM: owner, endorsement and lockout auth, and the
dictionary-attack parameters (`kmsctl tpm provision`, and `kmsctl up` for its swtpm).

Why: a TPM nobody provisioned has empty hierarchy auth. Anyone who can send it commands
may then clear the dictionary-attack lockout the auth guard works to avoid
(TPM2_DictionaryAttackLockReset), change the DA parameters, or erase every key with
TPM2_Clear (lockout auth). With random auth values only their holder can.

The same TSS calls serve swtpm and a real TPM (through /dev/tpmrm0 or any TCTI):

1. read TPM_PT_PERMANENT: which of ownerAuth, endorsementAuth, lockoutAuth are set;
2. for each one not yet set, make a random value and write it to the secrets directory
   (0600) *before* the TPM learns it, so that a crash in between never leaves a TPM
   with an auth nobody has; a value already set must have its file (else refused:
   `tpm.owned_elsewhere`, someone else provisioned this TPM);
3. TPM2_DictionaryAttackParameters under lockout auth (every run: idempotent);
4. TPM2_HierarchyChangeAuth for owner, endorsement, then lockout.

Run again, it finds the values set and its files present, and only re-applies the DA
parameters (proving the lockout file right). The crypto service then needs the owner
auth (its storage key is a primary under the owner hierarchy) and the endorsement auth
(the attestation key is an endorsement primary): `owner_auth_file` and
`endorsement_auth_file` in its [tpm2] section. The lockout auth stays with the operator:
`tpm2_dictionarylockout --clear-lockout -p file:<secrets>/tpm-lockout.auth`.

Auth values are 32 printable characters (128 random bits as hex), so tpm2-tools'
`-p file:PATH` and `-p str:...` both take them as they are.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekms.errors import FailedPrecondition, KMSError, PermissionDenied, Unavailable

HIERARCHIES = ("owner", "endorsement", "lockout")
# TPMA_PERMANENT bits.
_AUTH_SET_BITS = {"owner": 0x1, "endorsement": 0x2, "lockout": 0x4}
_IN_LOCKOUT = 0x200

DEFAULT_MAX_TRIES = 10
DEFAULT_RECOVERY_TIME = 600  # seconds until one failure is forgiven
DEFAULT_LOCKOUT_RECOVERY = 86400  # after a wrong lockout auth: a day


def auth_file(secrets_dir: Path, hierarchy: str) -> Path:
    return secrets_dir / f"tpm-{hierarchy}.auth"


def read_auth(path: Path) -> bytes:
    """An auth value file: its bytes, one trailing newline dropped."""
    value = path.read_bytes()
    if value.endswith(b"\n"):
        value = value[:-1]
    return value


@dataclass(frozen=True)
class DaParameters:
    max_tries: int = DEFAULT_MAX_TRIES
    recovery_time: int = DEFAULT_RECOVERY_TIME
    lockout_recovery: int = DEFAULT_LOCKOUT_RECOVERY


@dataclass(frozen=True)
class ProvisionResult:
    # hierarchy -> "set" (now) or "kept" (already set, with our file)
    auth: dict[str, str]
    da: DaParameters
    secrets_dir: Path

    def to_dict(self) -> dict[str, Any]:
        return {
            "auth": dict(self.auth),
            "max_tries": self.da.max_tries,
            "recovery_time": self.da.recovery_time,
            "lockout_recovery": self.da.lockout_recovery,
            "files": {h: str(auth_file(self.secrets_dir, h)) for h in HIERARCHIES},
        }


def _permanent(esys: Any) -> int:
    from tpm2_pytss.constants import TPM2_CAP, TPM2_PT

    _, data = esys.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.PERMANENT, 1)
    for prop in data.data.tpmProperties:
        if int(prop.property) == int(TPM2_PT.PERMANENT):
            return int(prop.value)
    return 0


def _tpm_error(exc: Exception, step: str) -> KMSError:
    from tpm2_pytss.constants import TPM2_RC

    error = getattr(exc, "error", None)
    details = {"step": step, "rc": f"0x{int(getattr(exc, 'rc', 0)):x}"}
    if error in (TPM2_RC.AUTH_FAIL, TPM2_RC.BAD_AUTH):
        return PermissionDenied(
            "tpm.provision_auth_failed",
            f"the TPM refused the stored auth value at {step}: the secrets directory does"
            " not hold this TPM's values",
            details,
        )
    if error == TPM2_RC.LOCKOUT:
        return FailedPrecondition(
            "tpm.lockout", f"the TPM is in lockout; {step} must wait for it", details
        )
    return Unavailable("tpm.provision_failed", f"TPM {step} failed: {exc}", details)


def provision(
    tcti: str,
    secrets_dir: Path,
    da: DaParameters | None = None,
) -> ProvisionResult:
    """Set the three hierarchy auth values and the DA parameters; idempotent."""
    from tpm2_pytss import ESAPI, TSS2_Exception
    from tpm2_pytss.constants import ESYS_TR
    from tpm2_pytss.types import TPM2B_AUTH

    from mgmt.pki import write_private

    da = da or DaParameters()
    try:
        esys = ESAPI(tcti)
    except Exception as exc:
        raise Unavailable(
            "tpm.unavailable", f"no TPM reachable through TCTI {tcti!r}: {exc}", {"tcti": tcti}
        ) from None
    handles = {"owner": ESYS_TR.OWNER, "endorsement": ESYS_TR.ENDORSEMENT}
    handles["lockout"] = ESYS_TR.LOCKOUT
    with esys:
        try:
            permanent = _permanent(esys)
        except TSS2_Exception as exc:
            raise _tpm_error(exc, "reading TPM_PT_PERMANENT") from None
        if permanent & _IN_LOCKOUT:
            raise FailedPrecondition(
                "tpm.lockout", "the TPM is in dictionary-attack lockout; provision it later"
            )
        current: dict[str, bytes] = {}
        wanted: dict[str, bytes] = {}
        outcome: dict[str, str] = {}
        for name in HIERARCHIES:
            path = auth_file(secrets_dir, name)
            if permanent & _AUTH_SET_BITS[name]:
                if not path.exists():
                    raise FailedPrecondition(
                        "tpm.owned_elsewhere",
                        f"the TPM's {name} auth is already set and {path} does not exist:"
                        " someone else provisioned this TPM",
                        {"hierarchy": name},
                    )
                current[name] = wanted[name] = read_auth(path)
                outcome[name] = "kept"
                continue
            if not path.exists():
                write_private(path, secrets.token_hex(16).encode())
            current[name] = b""
            wanted[name] = read_auth(path)
            outcome[name] = "set"
        try:
            esys.tr_set_auth(ESYS_TR.LOCKOUT, TPM2B_AUTH(current["lockout"]))
            esys.dictionary_attack_parameters(da.max_tries, da.recovery_time, da.lockout_recovery)
        except TSS2_Exception as exc:
            raise _tpm_error(exc, "TPM2_DictionaryAttackParameters") from None
        for name in HIERARCHIES:  # lockout last: it guards the rest
            if outcome[name] != "set":
                continue
            try:
                esys.tr_set_auth(handles[name], TPM2B_AUTH(current[name]))
                esys.hierarchy_change_auth(handles[name], TPM2B_AUTH(wanted[name]))
            except TSS2_Exception as exc:
                raise _tpm_error(exc, f"TPM2_HierarchyChangeAuth({name})") from None
    return ProvisionResult(outcome, da, secrets_dir)


def is_provisioned(tcti: str) -> bool:
    """True when all three hierarchy auth values are set (by whoever)."""
    from tpm2_pytss import ESAPI

    with ESAPI(tcti) as esys:
        permanent = _permanent(esys)
    return all(permanent & bit for bit in _AUTH_SET_BITS.values())
