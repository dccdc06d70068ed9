#!/usr/bin/env python3
"""edgekms-lock-platform TCTI: disable a TPM's platform hierarchy, as firmware does.

Why: swtpm opens the platform hierarchy with an empty auth after every
TPM2_Startup(CLEAR), and platform auth can clear the TPM. A machine's firmware disables
it at every boot; in the compose stack nothing boots, so the crypto-tpm role does it here
before it provisions the TPM and connects (mgmt.swtpm does the same for `kmsctl up`).
A hierarchy already disabled since swtpm's last start is the wanted state, not an error.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: edgekms-lock-platform TCTI", file=sys.stderr)
        return 64
    from tpm2_pytss import ESAPI, TSS2_Exception
    from tpm2_pytss.constants import ESYS_TR, TPM2_RC

    with ESAPI(argv[1]) as esys:
        try:
            esys.hierarchy_control(ESYS_TR.PLATFORM, ESYS_TR.PLATFORM, False)
        except TSS2_Exception as exc:
            if exc.error != TPM2_RC.HIERARCHY:
                raise
            print("edgekms-lock-platform already_disabled=true", file=sys.stderr)
            return 0
    print("edgekms-lock-platform disabled=platform", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
