"""pkilint run so that a document it cannot load fails the test instead of passing it.

The linters print a JSON report (`-f JSON`) only once they have loaded the document;
this helper parses that report and hands back its findings at WARNING or above, so an
empty list means "linted, nothing found" and never "could not read it".
"""

from __future__ import annotations

import contextlib
import io
import json
import secrets
from pathlib import Path
from typing import Any


def pkilint_findings(kind: str, der: bytes, tmp: Path) -> list[dict[str, Any]]:
    """kind: "cert" (lint_pkix_cert), "crl" or "arl" (lint_crl -p PKIX). Raises
    AssertionError when pkilint produced no report for the document."""
    from pkilint.bin import lint_crl, lint_pkix_cert

    path = tmp / f"lint-{kind}-{secrets.token_hex(4)}.der"
    path.write_bytes(der)
    out, err = io.StringIO(), io.StringIO()
    common = ["-s", "WARNING", "-f", "JSON", str(path)]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        if kind == "cert":
            lint_pkix_cert.main(["lint", *common])
        else:
            lint_crl.main(["lint", "-t", kind.upper(), "-p", "PKIX", *common])
    try:
        report = json.loads(out.getvalue())
    except json.JSONDecodeError:
        raise AssertionError(f"pkilint did not lint the {kind}: {err.getvalue()}") from None
    assert isinstance(report, dict) and isinstance(report.get("results"), list), report
    results: list[dict[str, Any]] = report["results"]
    return results
