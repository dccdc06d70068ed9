"""Mutual TLS with a client key that never leaves the device's TPM or PKCS#11 token: a
local forwarder.

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

A PKCS#11 key (Debian bookworm has no pkcs11 provider, only libp11's engine,
libengine-pkcs11-openssl): the child loads the engine through ctypes from the same
libcrypto its `ssl` module uses, gives it the module and the PIN (read in the child
from the PIN file or environment variable the config names, never argv), loads the key
by its RFC 7512 URI and sets it on the SSLContext's SSL_CTX. Python has no API for that:
the SSL_CTX pointer is read from the SSLContext object (CPython's PySSLContext holds it
first after the object header) and checked (its verify mode and options must match what
Python reports, SSL_CTX_check_private_key must accept the key) before it is used.

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

from edgekms.errors import FailedPrecondition, KMSError, PermissionDenied, Unavailable

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
    """What the child needs: nothing secret (the key file is TPM-wrapped; a PKCS#11 PIN
    is named by its file or environment variable, and read by the child)."""

    broker: str  # host:port
    server_name: str
    ca_cert: str
    cert: str
    key: str  # the TSS2 PEM file, or the PKCS#11 URI
    tcti: str = ""
    store: str = "tpm"  # or "pkcs11"
    pkcs11_module: str = ""
    pin_file: str = ""
    pin_env: str = ""


class KeyTunnel:
    """The running forwarder; `target` is what grpc.insecure_channel dials."""

    def __init__(self, spec: TunnelSpec, timeout: float = 30.0) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="edgekms-tunnel-"))
        os.chmod(self._dir, 0o700)
        self.socket_path = self._dir / "kms.sock"
        env = dict(os.environ)
        if spec.store == "tpm":
            conf = self._dir / "openssl.cnf"
            conf.write_text(_OPENSSL_CONF)
            env.update({"OPENSSL_CONF": str(conf), TCTI_ENV: tcti_of(spec.tcti)})
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
        return FailedPrecondition("tunnel.failed", "the key forwarder exited before it was ready")
    if data.get("code") == PermissionDenied.grpc_name:
        return PermissionDenied(reason, message)
    return FailedPrecondition(reason, message)


# -- the child ----------------------------------------------------------------------------


def _context(spec: TunnelSpec) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(spec.ca_cert)
    context.set_alpn_protocols(["h2"])
    if spec.store == "pkcs11":
        _use_engine_key(context, spec)
        return context
    try:
        context.load_cert_chain(spec.cert, spec.key)
    except (ssl.SSLError, OSError) as exc:
        raise FailedPrecondition(
            "device_key.tpm_unavailable",
            f"cannot use the TPM key {spec.key} through {spec.tcti}: {exc}"
            " (is the TPM there, and is this the TPM the key was made in?)",
        ) from None
    return context


def _pin(spec: TunnelSpec) -> str:
    if spec.pin_file:
        try:
            return Path(spec.pin_file).read_text().strip()
        except OSError as exc:
            raise FailedPrecondition(
                "device_key.pin_unreadable", f"cannot read the PIN file {spec.pin_file}: {exc}"
            ) from None
    value = os.environ.get(spec.pin_env, "") if spec.pin_env else ""
    if not value:
        raise FailedPrecondition(
            "device_key.pin_unreadable", f"no PIN: set {spec.pin_env or 'pin_file'}"
        )
    return value


ENGINE_SO = "/usr/lib/{arch}/engines-3/pkcs11.so"
# How CPython spells each verify mode to OpenSSL (SSL_VERIFY_PEER | ..._FAIL_IF_NO_PEER_CERT).
_SSL_VERIFY = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}


def _engine_so() -> str:
    import sysconfig

    arch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    return ENGINE_SO.format(arch=arch)


def _use_engine_key(context: ssl.SSLContext, spec: TunnelSpec) -> None:
    """The client certificate and the token's key (through libp11's engine) on the
    SSLContext's SSL_CTX; FailedPrecondition/PermissionDenied for what goes wrong."""
    import ctypes
    import ctypes.util

    def fail(reason: str, message: str) -> KMSError:
        cls = PermissionDenied if reason == "device_key.pin_incorrect" else FailedPrecondition
        return cls(reason, message)

    crypto = ctypes.CDLL(ctypes.util.find_library("crypto") or "libcrypto.so.3")
    libssl = ctypes.CDLL(ctypes.util.find_library("ssl") or "libssl.so.3")
    vp, cp = ctypes.c_void_p, ctypes.c_char_p
    crypto.ENGINE_by_id.restype = vp
    crypto.ENGINE_by_id.argtypes = [cp]
    crypto.ENGINE_ctrl_cmd_string.argtypes = [vp, cp, cp, ctypes.c_int]
    crypto.ENGINE_init.argtypes = [vp]
    crypto.ENGINE_load_private_key.restype = vp
    crypto.ENGINE_load_private_key.argtypes = [vp, cp, vp, vp]
    libssl.SSL_CTX_use_PrivateKey.argtypes = [vp, vp]
    libssl.SSL_CTX_use_certificate_chain_file.argtypes = [vp, cp]
    libssl.SSL_CTX_check_private_key.argtypes = [vp]
    libssl.SSL_CTX_get_verify_mode.argtypes = [vp]
    libssl.SSL_CTX_get_options.argtypes = [vp]
    libssl.SSL_CTX_get_options.restype = ctypes.c_uint64

    engine = crypto.ENGINE_by_id(b"dynamic")
    steps = [(b"SO_PATH", _engine_so().encode()), (b"ID", b"pkcs11"), (b"LOAD", None)]
    if not engine or not all(crypto.ENGINE_ctrl_cmd_string(engine, n, v, 0) for n, v in steps):
        raise fail(
            "device_key.engine_missing",
            f"cannot load the PKCS#11 engine {_engine_so()} (Debian libengine-pkcs11-openssl)",
        )
    if not crypto.ENGINE_ctrl_cmd_string(engine, b"MODULE_PATH", spec.pkcs11_module.encode(), 0):
        raise fail("device_key.module_unusable", f"engine refused module {spec.pkcs11_module}")
    if not crypto.ENGINE_init(engine):
        raise fail("device_key.module_unusable", f"cannot initialise {spec.pkcs11_module}")
    crypto.ENGINE_ctrl_cmd_string(engine, b"PIN", _pin(spec).encode(), 0)
    pkey = crypto.ENGINE_load_private_key(engine, spec.key.encode(), None, None)
    if not pkey:
        raise fail(
            "device_key.token_key_unusable",
            f"cannot load {spec.key} from {spec.pkcs11_module}: no such token or key, or a"
            " wrong PIN",
        )
    ctx = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if (
        not ctx
        or libssl.SSL_CTX_get_verify_mode(ctx) != _SSL_VERIFY[context.verify_mode]
        or libssl.SSL_CTX_get_options(ctx) != int(context.options)
    ):
        raise fail("tunnel.unsupported_python", "cannot find the SSL_CTX of this Python")
    if libssl.SSL_CTX_use_certificate_chain_file(ctx, spec.cert.encode()) != 1:
        raise fail("device_key.certificate_unreadable", f"cannot use certificate {spec.cert}")
    if libssl.SSL_CTX_use_PrivateKey(ctx, pkey) != 1 or libssl.SSL_CTX_check_private_key(ctx) != 1:
        raise fail("device_key.token_key_unusable", f"the token's key does not match {spec.cert}")


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
        out = {"reason": err.reason, "message": err.message, "code": err.grpc_name}
        print(json.dumps(out), flush=True)
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
