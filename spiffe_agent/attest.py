"""Who is calling, from the kernel: SO_PEERCRED (pid, uid, gid), then /proc.

Why the kernel: a workload has no secret to prove itself with (that is what it asks
for), so its identity is what the kernel says about the socket's other end: its uid and
gid, and from its pid the executable (path and SHA-256, read through /proc/<pid>/exe so
a file replaced on disk does not change what is hashed) and its systemd unit (the
cgroup). A pid can be reused: the process's start time is read before and after, and a
change means the caller is refused.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
from dataclasses import dataclass, field

from edgekms.errors import PermissionDenied

_UNIT_SUFFIXES = (".service", ".scope")


@dataclass(frozen=True)
class Caller:
    pid: int
    uid: int
    gid: int
    exe: str = ""
    sha256: str = ""
    unit: str = ""
    selectors: frozenset[str] = field(default_factory=frozenset)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of a connected Unix socket's peer."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def unit_of_cgroup(text: str) -> str:
    """The systemd unit a process runs in, as the system's manager sees it, from
    /proc/<pid>/cgroup.

    Only systemd's own hierarchies count: `name=systemd` (legacy and hybrid set-ups),
    then the unified one (`0::`); other controllers' paths are not systemd's word. In
    the path, slices are skipped and the first other component is the unit, if it names
    a service or scope. Why the first and not the last: a user's own manager
    (user@1000.service) is delegated its cgroup subtree and may name cgroups in it as
    it likes, so a process at `.../user@1000.service/app.slice/backup.service` is in
    the system unit user@1000.service, and only root can place one in backup.service.
    """
    paths: dict[str, str] = {}
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if controllers == "name=systemd":
            paths.setdefault("legacy", path.strip())
        elif hierarchy == "0" and not controllers:
            paths.setdefault("unified", path.strip())
    for key in ("legacy", "unified"):
        for part in paths.get(key, "").split("/"):
            if not part or part.endswith(".slice"):
                continue
            if part.endswith(_UNIT_SUFFIXES):
                return part
            break
    return ""


def selectors_of(caller: Caller) -> frozenset[str]:
    out = {f"unix:uid:{caller.uid}", f"unix:gid:{caller.gid}"}
    if caller.exe:
        out.add(f"unix:path:{caller.exe}")
    if caller.sha256:
        out.add(f"unix:sha256:{caller.sha256}")
    if caller.unit:
        out.add(f"systemd:unit:{caller.unit}")
    return frozenset(out)


def _start_time(proc: str) -> str:
    with open(f"{proc}/stat", encoding="ascii", errors="replace") as f:
        stat = f.read()
    # Field 22 (starttime) counted after the ")" that ends the command name.
    return stat.rsplit(")", 1)[1].split()[19]


class Attestor:
    """Attests callers; executable digests cached by (device, inode, size, mtime), so a
    busy interpreter is hashed once, not at every connection."""

    def __init__(self, proc_root: str = "/proc") -> None:
        self.proc_root = proc_root
        self._digests: dict[tuple[int, int, int, int], str] = {}

    def _digest(self, exe_link: str) -> str:
        st = os.stat(exe_link)
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        found = self._digests.get(key)
        if found is None:
            h = hashlib.sha256()
            with open(exe_link, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            found = h.hexdigest()
            if len(self._digests) > 4096:
                self._digests.clear()
            self._digests[key] = found
        return found

    def attest(self, pid: int, uid: int, gid: int) -> Caller:
        proc = f"{self.proc_root}/{pid}"
        try:
            started = _start_time(proc)
            exe = os.readlink(f"{proc}/exe").removesuffix(" (deleted)")
            digest = self._digest(f"{proc}/exe")
            with open(f"{proc}/cgroup", encoding="utf-8", errors="replace") as f:
                unit = unit_of_cgroup(f.read())
            if _start_time(proc) != started:
                raise PermissionDenied("spiffe.attestation_failed", "the caller's pid was reused")
        except OSError as exc:
            raise PermissionDenied(
                "spiffe.attestation_failed",
                f"cannot read /proc for pid {pid}: {exc.strerror}",
                {"pid": str(pid)},
            ) from None
        caller = Caller(pid, uid, gid, exe, digest, unit)
        return Caller(pid, uid, gid, exe, digest, unit, selectors_of(caller))
