"""A test workload: talks to the SPIFFE agent's socket as whatever uid it runs under.

Run by tests/spiffe as a separate process (Debian's python, `-S`, the venv's packages on
PYTHONPATH) under other uids, since the tests run as root; it prints JSON lines on
stdout. Only the standard library, grpcio, cryptography and our generated stubs.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import sys
import tempfile
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edgekms.v1 import workload_pb2 as wl
from edgekms.v1 import workload_pb2_grpc as wl_grpc

HEADER = (("workload.spiffe.io", "true"),)


def out(**values: Any) -> None:
    print(json.dumps(values), flush=True)


def stub(socket_path: str) -> wl_grpc.SpiffeWorkloadAPIStub:
    return wl_grpc.SpiffeWorkloadAPIStub(grpc.insecure_channel(f"unix:{socket_path}"))


def split_der(blob: bytes) -> list[x509.Certificate]:
    """Concatenated DER certificates (the Workload API's form), one by one."""
    certs = []
    while blob:
        if blob[1] < 0x80:
            size = 2 + blob[1]
        else:
            n = blob[1] & 0x7F
            size = 2 + n + int.from_bytes(blob[2 : 2 + n], "big")
        certs.append(x509.load_der_x509_certificate(blob[:size]))
        blob = blob[size:]
    return certs


def describe(svid: wl.X509SVID) -> dict[str, Any]:
    certs = split_der(svid.x509_svid)
    return {
        "spiffe_id": svid.spiffe_id,
        "serial": f"{certs[0].serial_number:X}",
        "not_before": certs[0].not_valid_before_utc.timestamp(),
        "not_after": certs[0].not_valid_after_utc.timestamp(),
        "chain": len(certs),
        "chain_der": [c.public_bytes(serialization.Encoding.DER).hex() for c in certs],
    }


def error(exc: grpc.RpcError) -> None:
    out(error=exc.code().name, details=exc.details())  # type: ignore[attr-defined]


def write_files(svid: wl.X509SVID, where: str) -> tuple[str, str, str]:
    certs = split_der(svid.x509_svid)
    roots = split_der(svid.bundle)
    key = serialization.load_der_private_key(svid.x509_svid_key, None)
    paths = (f"{where}/chain.pem", f"{where}/key.pem", f"{where}/bundle.pem")
    with open(paths[0], "wb") as f:
        f.write(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    with open(paths[1], "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    with open(paths[2], "wb") as f:
        f.write(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in roots))
    return paths


def peer_id(conn: ssl.SSLSocket) -> str:
    der = conn.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    values = uris.get_values_for_type(x509.UniformResourceIdentifier)
    return values[0] if len(values) == 1 else ""


def tls_context(svid: wl.X509SVID, server: bool) -> ssl.SSLContext:
    where = tempfile.mkdtemp()
    chain, key, bundle = write_files(svid, where)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(chain, key)
    ctx.load_verify_locations(bundle)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = False  # SPIFFE checks the URI SAN, not a host name
    return ctx


def main() -> int:
    mode, socket_path, *args = sys.argv[1:]
    api = stub(socket_path)
    try:
        if mode == "whoami":
            out(uid=os.getuid(), gid=os.getgid(), exe=os.readlink("/proc/self/exe"))
        elif mode == "x509":
            first = next(iter(api.FetchX509SVID(wl.X509SVIDRequest(), metadata=HEADER, timeout=60)))
            out(svids=[describe(s) for s in first.svids], bundles=sorted(first.federated_bundles))
        elif mode == "nohdr":
            next(iter(api.FetchX509SVID(wl.X509SVIDRequest(), timeout=30)))
            out(error="none")
        elif mode == "stream":
            count = int(args[0])
            for i, message in enumerate(
                api.FetchX509SVID(wl.X509SVIDRequest(), metadata=HEADER, timeout=600)
            ):
                out(
                    svids=[describe(s) for s in message.svids],
                    bundles=sorted(message.federated_bundles),
                )
                if i + 1 >= count:
                    break
        elif mode == "bundles":
            bundles = next(
                iter(api.FetchX509Bundles(wl.X509BundlesRequest(), metadata=HEADER, timeout=60))
            )
            out(bundles={k: len(split_der(v)) for k, v in bundles.bundles.items()})
        elif mode == "jwtbundles":
            count = int(args[0])
            for i, jwt_bundles in enumerate(
                api.FetchJWTBundles(wl.JWTBundlesRequest(), metadata=HEADER, timeout=600)
            ):
                kids = {
                    td: sorted(k["kid"] for k in json.loads(jwks)["keys"])
                    for td, jwks in jwt_bundles.bundles.items()
                }
                out(kids=kids)
                if i + 1 >= count:
                    break
        elif mode == "jwt":
            answer = api.FetchJWTSVID(wl.JWTSVIDRequest(audience=args), metadata=HEADER, timeout=60)
            out(svids=[{"spiffe_id": s.spiffe_id, "token": s.svid} for s in answer.svids])
        elif mode == "validate":
            audience, token = args
            valid = api.ValidateJWTSVID(
                wl.ValidateJWTSVIDRequest(audience=audience, svid=token),
                metadata=HEADER,
                timeout=60,
            )
            out(spiffe_id=valid.spiffe_id, sub=valid.claims["sub"])
        elif mode == "tls-server":
            svid = next(
                iter(api.FetchX509SVID(wl.X509SVIDRequest(), metadata=HEADER, timeout=60))
            ).svids[0]
            ctx = tls_context(svid, server=True)
            with socket.create_server(("127.0.0.1", 0)) as listener:
                out(port=listener.getsockname()[1], me=svid.spiffe_id)
                listener.settimeout(120)
                conn, _ = listener.accept()
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    peer = peer_id(tls)
                    tls.sendall(f"hello {peer}\n".encode())
                    out(peer=peer)
        elif mode == "tls-client":
            port = int(args[0])
            svid = next(
                iter(api.FetchX509SVID(wl.X509SVIDRequest(), metadata=HEADER, timeout=60))
            ).svids[0]
            ctx = tls_context(svid, server=False)
            raw = socket.create_connection(("127.0.0.1", port), timeout=60)
            with ctx.wrap_socket(raw) as tls:
                peer = peer_id(tls)
                line = tls.recv(200).decode().strip()
                out(peer=peer, me=svid.spiffe_id, said=line)
        else:
            out(error=f"unknown mode {mode}")
            return 2
    except grpc.RpcError as exc:
        error(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
