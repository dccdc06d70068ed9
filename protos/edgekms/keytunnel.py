"""Mutual TLS with a client key that never leaves the device's TPM: a local forwarder.

grpcio (BoringSSL) takes a client private key only as PEM bytes, so a key that lives in
a TPM cannot be handed to it. Instead, the gRPC channel speaks plain HTTP/2 to a Unix
socket in a fresh 0700 directory, and a child process (`python -m edgekms.keytunnel`)
accepts there and opens the TLS connection to the broker with Python's `ssl` module. Its
OpenSSL loads the tpm2 provider (Debian's tpm2-openssl) from an OPENSSL_CONF written
for it, which reads the `-----BEGIN TSS2 PRIVATE KEY-----` file: a blob wrapped by the
TPM's storage key, useless anywhere else. Every handshake's signature is made in the TPM.

Why a child process and not the caller's own `ssl`: OpenSSL reads its config once per
process, and the provider must be preferred (`default_properties = ?provider=tpm2`:
OpenSSL 3.0 otherwise signs with the default provider and fails "missing private key"),
which must not steer every other TLS connection the caller makes. Digests, ciphers and
random numbers stay OpenSSL's own (`-tpm2.digest,...`): the TPM does the key's work
only. The TPM must be behind a resource manager (the kernel's /dev/tpmrm0, or
tpm2-abrmd): a handshake needs more objects at once than a bare TPM's three slots. The
child exits when its parent goes (its stdin closes) or on close(); the socket's
directory is removed with it.

The broker is verified as grpc would: against the config's CA, for `server_name` (or the
host), with ALPN "h2". Anyone who can connect to the socket speaks as this device, which
is why it sits in a directory only the caller's user may enter; that user can use the
TPM key anyway. The parent imports nothing beyond the standard library, so the slim
client distribution gains no dependency (the provider is an OS package).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekms.errors import FailedPrecondition, KMSError, Unavailable

# tpm2-openssl reads its TCTI from this variable ("device:/dev/tpmrm0", "swtpm:...").
TCTI_ENV = "TPM2OPENSSL_TCTI"
DEFAULT_TCTI = "device:/dev/tpmrm0"
READY = "ready"
_OPENSSL_CONF = """\
openssl_conf = edgekms_init

[edgekms_init]
providers = edgekms_providers
alg_section = edgekms_algorithms

[edgekms_providers]
default = edgekms_default
tpm2 = edgekms_tpm2

[edgekms_default]
activate = 1

[edgekms_tpm2]
activate = 1

[edgekms_algorithms]
default_properties = ?provider=tpm2,-tpm2.digest,-tpm2.cipher,-tpm2.rand
"""


def tcti_of(value: str) -> str:
    """A device path becomes the device TCTI; anything else is taken as a TCTI string."""
    return f"device:{value}" if value.startswith("/dev/") else value


@dataclass(frozen=True)
class TunnelSpec:
    """What the child needs: nothing secret (the key file is TPM-wrapped)."""

    broker: str  # host:port
    server_name: str
    ca_cert: str
    cert: str
    key: str
    tcti: str


class KeyTunnel:
    """The running forwarder; `target` is what grpc.insecure_channel dials."""

    def __init__(self, spec: TunnelSpec, timeout: float = 30.0) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="edgekms-tunnel-"))
        os.chmod(self._dir, 0o700)
        self.socket_path = self._dir / "kms.sock"
        conf = self._dir / "openssl.cnf"
        conf.write_text(_OPENSSL_CONF)
        env = dict(os.environ, OPENSSL_CONF=str(conf), **{TCTI_ENV: tcti_of(spec.tcti)})
        args = {**spec.__dict__, "socket": str(self.socket_path)}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "edgekms.keytunnel"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        try:
            self._proc.stdin.write(json.dumps(args) + "\n")
            self._proc.stdin.flush()
            line = _readline(self._proc, timeout)
        except BaseException:
            self.close()
            raise
        if line.strip() != READY:
            self.close()
            raise _error_from(line)

    @property
    def target(self) -> str:
        return f"unix:{self.socket_path}"

    def close(self) -> None:
        """Stop the child and remove its directory (idempotent)."""
        proc = self._proc
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    """The child's first line (READY or a JSON error), waiting at most `timeout`."""
    out: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    if not out:
        raise Unavailable(
            "tunnel.timeout", f"the TPM key forwarder did not start within {timeout:g}s"
        )
    return out[0]


def _error_from(line: str) -> KMSError:
    try:
        data = json.loads(line)
        reason, message = str(data["reason"]), str(data["message"])
    except (ValueError, KeyError, TypeError):
        return FailedPrecondition(
            "tunnel.failed", "the TPM key forwarder exited before it was ready"
        )
    return FailedPrecondition(reason, message)


# -- the child ----------------------------------------------------------------------------


def _context(spec: TunnelSpec) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(spec.ca_cert)
    context.set_alpn_protocols(["h2"])
    try:
        context.load_cert_chain(spec.cert, spec.key)
    except (ssl.SSLError, OSError) as exc:
        raise FailedPrecondition(
            "device_key.tpm_unavailable",
            f"cannot use the TPM key {spec.key} through {spec.tcti}: {exc}"
            " (is the TPM there, and is this the TPM the key was made in?)",
        ) from None
    return context


def _relay(conn: socket.socket, tls: ssl.SSLSocket) -> None:
    """Copy bytes both ways in one thread: an OpenSSL connection must not be read and
    written from two threads at once. Reads from TLS are non-blocking (a readable socket
    may hold only a session ticket), writes block."""
    while True:
        ready = [tls] if tls.pending() else select.select([conn, tls], [], [])[0]
        if tls in ready:
            tls.settimeout(0.0)
            try:
                data: bytes | None = tls.recv(65536)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                data = None
            finally:
                tls.settimeout(None)
            if data == b"":
                return
            if data:
                conn.sendall(data)
        if conn in ready:
            data = conn.recv(65536)
            if not data:
                return
            tls.sendall(data)


def _serve_one(conn: socket.socket, spec: TunnelSpec, context: ssl.SSLContext) -> None:
    host, _, port = spec.broker.rpartition(":")
    host = host.strip("[]")
    try:
        raw = socket.create_connection((host, int(port)), timeout=30)
        tls = context.wrap_socket(raw, server_hostname=spec.server_name or host)
        tls.settimeout(None)
    except OSError as exc:
        print(json.dumps({"event": "tunnel_connect_failed", "error": str(exc)}), file=sys.stderr)
        conn.close()
        return
    try:
        _relay(conn, tls)
    except OSError as exc:
        print(json.dumps({"event": "tunnel_closed", "error": str(exc)}), file=sys.stderr)
    finally:
        conn.close()
        tls.close()


def _watch_parent() -> None:
    """Exit when the parent's end of stdin closes (it exited or closed us)."""
    sys.stdin.read()
    os._exit(0)


def main() -> int:
    raw: dict[str, Any] = json.loads(sys.stdin.readline())
    path = raw.pop("socket")
    spec = TunnelSpec(**raw)
    try:
        context = _context(spec)
    except KMSError as err:
        print(json.dumps({"reason": err.reason, "message": err.message}), flush=True)
        return 1
    old = os.umask(0o077)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.umask(old)
    listener.listen(16)
    threading.Thread(target=_watch_parent, daemon=True).start()
    print(READY, flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_serve_one, args=(conn, spec, context), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
