"""The socket workloads dial, and how each call learns who dialed it.

gRPC's Python server gives a handler the peer's address, not its socket, so it cannot
ask the kernel for SO_PEERCRED itself. The gate therefore accepts on the public socket,
attests the peer at once (while its pid is certainly the caller's), and relays the
connection to the gRPC server on a private socket from a client socket bound to a
fresh path of its own; the handler's `context.peer()` is that path, which maps to the
attested caller. The private directory is 0700: only the agent's user reaches the
inner server, so no one can skip the gate.

The public socket is 0666 in a 0755 directory, as SPIRE's agent does: connecting
proves nothing, identity comes from the kernel, and a program with no entry gets
PERMISSION_DENIED and no identity. Tighten it with the directory's group if only some
users should reach it at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import stat
from pathlib import Path

from edgekms.errors import FailedPrecondition, KMSError
from spiffe_agent.attest import Attestor, Caller, peer_credentials

log = logging.getLogger(__name__)
_CHUNK = 65536


class Gate:
    def __init__(self, public: Path, private_dir: Path, attestor: Attestor) -> None:
        self.public = public
        self.private_dir = private_dir
        self.inner = private_dir / "grpc.sock"
        self.attestor = attestor
        self.callers: dict[str, Caller | KMSError] = {}
        self._server: asyncio.AbstractServer | None = None
        self._inode = -1
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.public.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        claim_socket_path(self.public)
        (self.private_dir / "peers").mkdir(mode=0o700, exist_ok=True)
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.public))
        # Anyone local may connect; who they are comes from the kernel (docstring).
        os.chmod(self.public, 0o666)  # noqa: S103
        self._inode = os.stat(self.public).st_ino

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        # Only our own socket: another agent may have the path now (after a restart).
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.public).st_ino == self._inode:
                self.public.unlink()

    def caller(self, peer: str) -> Caller | KMSError | None:
        return self.callers.get(peer)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        sock: socket.socket = writer.get_extra_info("socket")
        bound = self.private_dir / "peers" / secrets.token_hex(8)
        key = f"unix:{bound}"
        try:
            pid, uid, gid = peer_credentials(sock)
            try:
                found: Caller | KMSError = await asyncio.to_thread(
                    self.attestor.attest, pid, uid, gid
                )
            except KMSError as exc:  # answered on the call, as PERMISSION_DENIED
                found = exc
            self.callers[key] = found
            log.debug("event=spiffe_connection pid=%d uid=%d gid=%d", pid, uid, gid)
            inner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            inner.bind(str(bound))
            inner.setblocking(False)
            await asyncio.get_running_loop().sock_connect(inner, str(self.inner))
            in_reader, in_writer = await asyncio.open_unix_connection(sock=inner)
            await asyncio.gather(_pump(reader, in_writer), _pump(in_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self.callers.pop(key, None)
            with contextlib.suppress(FileNotFoundError):
                bound.unlink()
            writer.close()
            self._tasks.discard(task)


def claim_socket_path(path: Path) -> None:
    """Make `path` free for our socket, or refuse: FailedPrecondition
    `spiffe.socket_in_use` if an agent answers there (taking its path would cut off
    every workload it serves without it knowing), `spiffe.socket_unusable` if something
    other than a socket is there (a typo'd path must not delete a file). A socket
    nobody answers on is a dead agent's and is removed."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FailedPrecondition(
            "spiffe.socket_unusable", f"{path} exists and is not a socket", {"path": str(path)}
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2.0)
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)  # refused: nobody listens, a stale socket
        return
    finally:
        probe.close()
    raise FailedPrecondition(
        "spiffe.socket_in_use",
        f"another agent serves {path}: stop it first, or give another --socket",
        {"path": str(path)},
    )


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    except (OSError, ConnectionError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()
            else:
                writer.close()
