"""Regenerate the Python code for protos/edgekms/v1/*.proto (`make protos`).

The generated modules are committed so that installing EdgeKMS needs no protoc; the
test suite regenerates into a temporary directory and fails if the committed code is
stale. Pass an output directory to generate elsewhere (the staleness test does).
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_FILES = sorted(
    p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / "edgekms" / "v1").glob("*.proto")
)
# Only these services get gRPC stubs; the rest are message-only (NATS payloads).
GRPC_FILES = {
    Path("edgekms/v1/keys.proto"),
    Path("edgekms/v1/ca.proto"),
    Path("edgekms/v1/audit.proto"),
    Path("edgekms/v1/clients.proto"),
}


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    # The mypy-protobuf plugins live beside this interpreter, whatever PATH says.
    bindir = Path(sys.executable).parent
    for proto in PROTO_FILES:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
            f"--python_out={out}",
            f"--mypy_out={out}",
        ]
        if proto in GRPC_FILES:
            args += [f"--grpc_python_out={out}", f"--mypy_grpc_out={out}"]
        args.append(str(proto))
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT)
