"""SoftHSM tokens for development, tests and `kmsctl up`: config file and token init.

softhsm2-util reads PINs from a terminal only, and PINs must never reach argv, so the
token is initialised through a pseudo-terminal that we type the PINs into.
"""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SOFTHSM_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/arm-linux-gnueabihf/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


class SoftHSMError(RuntimeError):
    """SoftHSM is missing or its token could not be made."""


def find_module() -> str:
    for candidate in SOFTHSM_MODULE_CANDIDATES:
        if os.path.exists(candidate):
            return candidate
    raise SoftHSMError("libsofthsm2.so not found: install the softhsm2 package")


@dataclass(frozen=True)
class SoftHSMToken:
    conf: Path
    module: str
    label: str

    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}


def write_conf(directory: Path) -> Path:
    tokens = directory / "tokens"
    tokens.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
        "slots.removable = false\n"
    )
    return conf


def token_exists(conf: Path, label: str) -> bool:
    out = subprocess.run(
        ["softhsm2-util", "--show-slots"],
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return any(
        line.split(":", 1)[-1].strip() == label for line in out.splitlines() if "Label:" in line
    )


def init_token(directory: Path, label: str, pin: str, so_pin: str) -> SoftHSMToken:
    """Create `directory/softhsm2.conf` and a token `label` in it, unless it exists."""
    if shutil.which("softhsm2-util") is None:
        raise SoftHSMError("softhsm2-util not found: install the softhsm2 package")
    conf = write_conf(directory)
    token = SoftHSMToken(conf=conf, module=find_module(), label=label)
    if token_exists(conf, label):
        return token
    answers = [so_pin, so_pin, pin, pin]
    _run_with_tty(
        ["softhsm2-util", "--init-token", "--free", "--label", label],
        {**os.environ, "SOFTHSM2_CONF": str(conf)},
        answers,
    )
    if not token_exists(conf, label):
        raise SoftHSMError(f"softhsm2-util did not create token {label!r}")
    return token


def _run_with_tty(argv: list[str], env: dict[str, str], answers: list[str]) -> None:
    """Run `argv` on a pseudo-terminal, answering each "PIN:" prompt with the next answer."""
    pid, fd = pty.fork()
    if pid == 0:  # child
        try:
            os.execvpe(argv[0], argv, env)
        finally:
            os._exit(127)
    output = b""
    pending = list(answers)
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
            if pending and output.rstrip().endswith(b":"):
                os.write(fd, pending.pop(0).encode() + b"\n")
                output = b""
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        tail = output.decode(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise SoftHSMError(f"softhsm2-util --init-token failed: {tail[0]}")
