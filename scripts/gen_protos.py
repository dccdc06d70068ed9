"""Regenerate the Python code for protos/edgekms/v1/*.proto (`make protos`).

The generated modules are committed so that installing EdgeKMS needs no protoc; the
test suite regenerates into a temporary directory and fails if the committed code is
stale. Pass an output directory to generate elsewhere (the staleness test does).

The same committed code must import on two runtimes: the lock's (grpcio 1.85, protobuf
7.x, which generate it) and the board's (Yocto scarthgap: grpcio 1.62.2, protobuf 4.25.8,
requirements-board.txt). The lock's generators emit three things the board's runtime
lacks, so `compat` rewrites them after protoc, the same way every time (the staleness
test runs this too, so the committed code stays exactly what this script produces):

- `from google.protobuf import runtime_version` (protobuf >= 5.26 only) and its
  ValidateProtobufRuntimeVersion call: the import is guarded, and the check still runs
  wherever the module exists;
- grpcio's "generated code needs grpcio >= 1.85.1" refusal: replaced by a floor of
  GRPCIO_FLOOR, the oldest runtime the end-to-end tests pass on;
- registered methods (`_registered_method=True`, `add_registered_method_handlers`,
  grpcio >= 1.63): passed only where the runtime has them, since they are a speed-up,
  not a behaviour.
"""

from __future__ import annotations

import re
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
    Path("edgekms/v1/enroll.proto"),
    Path("edgekms/v1/workload.proto"),
}


# The oldest grpcio the generated stubs accept: scarthgap's (the board's).
GRPCIO_FLOOR = (1, 62)

_PB2_IMPORT = "from google.protobuf import runtime_version as _runtime_version\n"
_PB2_IMPORT_GUARDED = (
    "try:\n"
    "  from google.protobuf import runtime_version as _runtime_version\n"
    "except ImportError:  # protobuf < 5.26 (the board's 4.25): no runtime version check\n"
    "  _runtime_version = None\n"
)
_PB2_CHECK = re.compile(
    r"^_runtime_version\.ValidateProtobufRuntimeVersion\(\n(?:.*\n)*?\)\n", re.M
)
_GRPC_CHECK = re.compile(
    r"^GRPC_GENERATED_VERSION = '[0-9.]+'\n(?:.*\n)*?if _version_not_supported:\n"
    r"    raise RuntimeError\(\n(?:        .*\n)*?    \)\n",
    re.M,
)
_GRPC_CHECK_COMPAT = (
    "# EdgeKMS (scripts/gen_protos.py): this code also runs on grpcio {floor}, the board's.\n"
    "GRPC_VERSION = grpc.__version__\n"
    "if tuple(int(p) for p in GRPC_VERSION.split('.')[:2]) < {floor_tuple}:\n"
    "    raise RuntimeError(\n"
    "        f'The grpc package installed is at version {{GRPC_VERSION}},'\n"
    "        + ' but the generated code in {module} needs grpcio>={floor}.'\n"
    "    )\n"
    "# Registered methods (grpcio >= 1.63) are a speed-up: used where the runtime has them.\n"
    "_REGISTERED_METHODS = hasattr(grpc.Server, 'add_registered_method_handlers')\n"
    "_REGISTERED_METHOD_KWARGS = {{'_registered_method': True}} if _REGISTERED_METHODS else {{}}\n"
)
_GRPC_REGISTERED_KWARG = "_registered_method=True)"
_GRPC_REGISTERED_ADD = re.compile(r"^    server\.add_registered_method_handlers\(", re.M)


def _substitute(text: str, name: str, old: str | re.Pattern[str], new: str) -> str:
    """Replace `old` (at least once) or fail: a generator whose output changed shape
    must be looked at, not silently committed half-rewritten."""
    if isinstance(old, str):
        count = text.count(old)
        text = text.replace(old, new)
    else:
        text, count = old.subn(new.replace("\\", "\\\\"), text)
    if count == 0:
        raise SystemExit(f"gen_protos: {name}: the generated code no longer has {old!r}")
    return text


def compat(path: Path) -> None:
    """Rewrite one generated module so it imports on the lock's and the board's runtimes."""
    text = path.read_text()
    module = path.relative_to(path.parent.parent.parent).as_posix()
    if path.name.endswith("_pb2.py"):
        text = _substitute(text, module, _PB2_IMPORT, _PB2_IMPORT_GUARDED)
        check = _PB2_CHECK.search(text)
        if check is None:
            raise SystemExit(f"gen_protos: {module}: no ValidateProtobufRuntimeVersion call")
        guarded = "if _runtime_version is not None:\n" + "".join(
            f"  {line}\n" for line in check.group(0).splitlines()
        )
        text = text[: check.start()] + guarded + text[check.end() :]
    elif path.name.endswith("_pb2_grpc.py"):
        floor = ".".join(str(p) for p in GRPCIO_FLOOR)
        text = _substitute(
            text,
            module,
            _GRPC_CHECK,
            _GRPC_CHECK_COMPAT.format(floor=floor, floor_tuple=GRPCIO_FLOOR, module=module),
        )
        text = _substitute(text, module, _GRPC_REGISTERED_KWARG, "**_REGISTERED_METHOD_KWARGS)")
        text = _substitute(
            text,
            module,
            _GRPC_REGISTERED_ADD,
            "    if _REGISTERED_METHODS:\n        server.add_registered_method_handlers(",
        )
    path.write_text(text)


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
    for generated in sorted((out / "edgekms" / "v1").glob("*_pb2*.py")):
        compat(generated)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT)
