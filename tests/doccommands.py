"""The `kmsctl` command lines README.md and docs/*.md show, and which test runs each.

Issue 14, item 9: every command in the docs runs in the suite. tests/test_docs_commands.py
parses every line found here, and fails when one is neither in a block some test runs as
written (RUN) nor listed, with its reason, as one the suite cannot run (CANNOT_RUN). The
tests that run blocks take them from the doc text through `block()`, so what runs is
what a reader copies.

A command line is a line of a fenced block (```sh, ```bash, ```console, ```text or a bare
```) that starts with `kmsctl ` and an option or a command name (the architecture
pictures start lines with `kmsctl` too), or the `kmsctl ...` of `$(kmsctl ...)`;
continuation lines are joined, `&&` and `|` split a line, a leading `! ` (the command
must fail) and a trailing `&` are dropped. A block is named by the doc, the nearest heading
above it (outside fences) and its index among that heading's such blocks.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import SLOWDOWN

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
SHELL_LANGS = {"", "sh", "bash", "console", "text"}
HEADING = re.compile(r"^#{1,6} .*$", re.MULTILINE)
COMMAND = re.compile(r"^kmsctl (?:-|[a-z])")


@dataclass(frozen=True)
class Block:
    doc: str  # "README.md" or "docs/cluster.md"
    heading: str  # the nearest heading line above the block, "## Devices"
    index: int  # among that heading's shell blocks, from 0
    text: str

    @property
    def commands(self) -> list[str]:
        found = []
        for line in self.text.replace("\\\n", " ").splitlines():
            line = re.sub(r"^\s*!\s+", "", line)  # `! kmsctl ...`: must fail, still a command
            inner = re.findall(r"\$\((kmsctl [^)]*)\)", line)  # `x=$(kmsctl ...)`
            for part in [*inner, *re.split(r"&&|\|", line)]:
                command = part.strip().removesuffix("&").strip()
                if COMMAND.match(command):
                    found.append(command)
        return found


def _blocks(path: Path) -> list[Block]:
    text = path.read_text()
    fences = list(FENCE.finditer(text))
    inside = [(m.start(), m.end()) for m in fences]
    headings = [h for h in HEADING.finditer(text) if not any(a <= h.start() < b for a, b in inside)]
    name = str(path.relative_to(ROOT))
    found: list[Block] = []
    counts: dict[str, int] = {}
    for fence in fences:
        if fence.group(1) not in SHELL_LANGS:
            continue
        above = [h.group(0) for h in headings if h.start() < fence.start()]
        heading = above[-1] if above else ""
        index = counts.get(heading, 0)
        counts[heading] = index + 1
        found.append(Block(name, heading, index, fence.group(2)))
    return found


def blocks() -> list[Block]:
    return [b for doc in DOCS for b in _blocks(doc)]


def block(doc: str, heading: str, index: int = 0) -> Block:
    """The `index`th shell block under `heading` in `doc`, for a test that runs it."""
    for found in blocks():
        if (found.doc, found.heading, found.index) == (doc, heading, index):
            return found
    raise LookupError(f"{doc}: no block {index} under {heading!r}")


def commands() -> list[tuple[str, str]]:
    """(doc, command line) for every `kmsctl` line of the docs."""
    return [(b.doc, c) for b in blocks() for c in b.commands]


@dataclass
class Ran:
    line: str
    code: int
    out: str
    err: str


def lines(text: str) -> list[str]:
    """The block's shell lines, continuations joined, blank and comment-only dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [s for s in joined.splitlines() if s.strip() and not s.lstrip().startswith("#")]


def run_lines(
    shell_lines: list[str], cwd: Path, env: dict[str, str], refused: tuple[str, ...] = ()
) -> list[Ran]:
    """Each line under `set -euo pipefail`, in turn; exit 0 asserted but for the lines
    containing one of `refused` (the doc says they fail), whose exit must not be 0."""
    ran = []
    for line in shell_lines:
        done = subprocess.run(
            ["bash", "-c", "set -euo pipefail\n" + line],
            cwd=cwd, env=env, capture_output=True, text=True, timeout=180 * SLOWDOWN,
        )  # fmt: skip
        result = Ran(line, done.returncode, done.stdout, done.stderr)
        if any(r in line for r in refused):
            assert result.code != 0, f"`{line}` was to be refused:\n{result.out}"
        else:
            assert result.code == 0, f"`{line}` exit {result.code}:\n{result.out}{result.err}"
        ran.append(result)
    return ran


# Blocks some test runs as written: (doc, heading, index) -> the test (its file must
# name the heading; test_docs_commands.py checks it).
RUN: dict[tuple[str, str, int], str] = {
    ("README.md", "## A five-minute tour", 0): "tests/e2e/test_readme.py",
    ("README.md", "## A five-minute tour", 1): "tests/e2e/test_docs_run.py",
    ("README.md", "## Who may do what", 0): "tests/e2e/test_readme.py",
    ("README.md", "## Devices", 0): "tests/enroll/test_readme_devices.py",
    ("README.md", "## Devices", 1): "tests/attest/test_docs_tpm.py",
    ("README.md", "## Devices", 2): "tests/attest/test_docs_tpm.py",
    ("README.md", "### Enrollment proven by the device's TPM", 0): "tests/attest/test_docs_tpm.py",
    ("README.md", "### Enrollment proven by the device's TPM", 1): "tests/attest/test_docs_tpm.py",
    ("README.md", "### Enrollment proven by the device's TPM", 2): "tests/attest/test_docs_tpm.py",
    ("docs/security.md", "## Remote unlock", 0): "tests/attest/test_docs_tpm.py",
    ("README.md", "## Certificates for your NAS: OpenVPN and HTTPS", 0): (
        "tests/e2e/test_docs_run.py"
    ),
    ("README.md", "## Certificates for your NAS: OpenVPN and HTTPS", 1): (
        "tests/e2e/test_docs_run.py"
    ),
    ("README.md", "## Certificates for your NAS: OpenVPN and HTTPS", 2): (
        "tests/e2e/test_docs_run.py"
    ),
    ("README.md", "## Certificates for your NAS: OpenVPN and HTTPS", 4): (
        "tests/e2e/test_docs_run.py"
    ),
    ("README.md", "## Certificates for your NAS: OpenVPN and HTTPS", 5): (
        "tests/e2e/test_docs_run.py"
    ),
    ("README.md", "## Certificates for your NAS: OpenVPN and HTTPS", 7): (
        "tests/e2e/test_docs_run.py"
    ),
    ("README.md", "## Certificates for your NAS: OpenVPN and HTTPS", 8): (
        "tests/e2e/test_docs_run.py"
    ),
    ("README.md", "## Certificates for your NAS: OpenVPN and HTTPS", 9): (
        "tests/e2e/test_docs_run.py"
    ),
    ("README.md", "## ACME: certbot, lego and the NAS's own clients", 0): (
        "tests/e2e/test_acme_stack.py"
    ),
    ("README.md", "## Devices keep themselves fresh: `kmsctl agent`", 0): (
        "tests/agent/test_readme_agent.py"
    ),
    ("README.md", "## Workload identity: SPIFFE", 0): "tests/spiffe/test_readme_spiffe.py",
    ("README.md", "## Workload identity: SPIFFE", 1): "tests/spiffe/test_readme_spiffe.py",
    ("docs/containers.md", "## How `make test` runs the stack", 0): ("tests/e2e/test_docs_run.py"),
    ("docs/deploy.md", "## Compose", 0): "tests/e2e/test_docs_run.py",
    ("docs/deploy.md", "## Backup and restore", 0): "tests/e2e/test_docs_run.py",
    ("docs/agent.md", "## Running it", 0): "tests/agent/test_docs_agent.py",
    ("docs/cluster.md", "## Three nodes with `kmsctl up`", 0): "tests/cluster/test_docs_cluster.py",
    ("docs/cluster.md", "## Three nodes with `kmsctl up`", 1): "tests/cluster/test_docs_cluster.py",
    ("docs/cluster.md", "## Three nodes with `kmsctl up`", 2): "tests/cluster/test_docs_cluster.py",
    ("docs/cluster.md", "## Adding and removing a node", 0): "tests/cluster/test_docs_cluster.py",
    ("README.md", "## Who may do what", 1): "tests/fleet/test_docs_fleet.py",
    ("docs/cluster.md", "## Fleet: devices as leaf nodes", 2): "tests/fleet/test_docs_fleet.py",
    ("docs/cluster.md", "## Fleet: devices as leaf nodes", 3): "tests/fleet/test_docs_fleet.py",
    ("docs/cluster.md", "## Fleet: devices as leaf nodes", 4): "tests/fleet/test_docs_fleet.py",
    ("docs/cluster.md", "## Fleet: devices as leaf nodes", 5): "tests/fleet/test_docs_fleet.py",
    ("docs/cluster.md", "## Fleet: devices as leaf nodes", 6): "tests/fleet/test_docs_fleet.py",
    ("docs/cluster.md", "## Fleet: devices as leaf nodes", 7): "tests/cluster/test_docs_cluster.py",
    ("docs/spiffe.md", "## Federation", 0): "tests/spiffe/test_docs_federation.py",
    ("docs/spiffe.md", "## Federation", 1): "tests/spiffe/test_docs_federation.py",
    ("docs/spiffe.md", "## Federation", 2): "tests/spiffe/test_docs_federation.py",
    ("docs/spiffe.md", "## Federation", 3): "tests/spiffe/test_docs_federation.py",
    ("docs/spiffe.md", "## Registration entries", 0): "tests/e2e/test_docs_run.py",
    ("docs/spiffe.md", "## Rotating the trust domain's keys", 0): "tests/e2e/test_docs_run.py",
}

# Command lines the suite cannot run, each with why. Keep it short and honest: a line
# here is a line no test runs.
CANNOT_RUN: dict[str, str] = {
    # On an existing token: OP-TEE's PKCS#11 module exists only on the board.
    "kmsctl up --data-dir /var/lib/edgekms/node --join bundles/nas1 "
    "--pkcs11-module /usr/lib/libckteec.so.0 --pkcs11-token-label edgekms "
    "--pkcs11-pin-file /var/lib/edgekms/secrets/hsm0.pin": (
        "libckteec (OP-TEE's token) is on the board only; tests/e2e/test_external_token.py "
        "runs `up --pkcs11-module ...` on a SoftHSM token made beforehand"
    ),
    # The boot-time unlock: a real TPM at the default path and the LAN.
    "kmsctl unlock fetch --volume data --device-dir /etc/edgekms --mdns "
    "--out /run/cryptsetup-keys.d/data.key": (
        "no --tcti: the default TPM /dev/tpmrm0, and mDNS on every interface; "
        "tests/unlock/test_unlock.py runs it with --tcti and --mdns-interface 127.0.0.1"
    ),
    "kmsctl unlock fetch --volume data": (
        "piped into `cryptsetup open /dev/sdb2`: a block device, device-mapper and the "
        "default TPM; tests/unlock/test_unlock.py feeds cryptsetup through a FIFO instead"
    ),
}
