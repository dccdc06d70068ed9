"""The committed generated code matches the .proto files (run `make protos` if not)."""

from __future__ import annotations

import filecmp
import importlib.util
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "protos" / "edgekms" / "v1"


def _load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = module
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_current(tmp_path: Path) -> None:
    _load_generator().generate(tmp_path)
    fresh = tmp_path / "edgekms" / "v1"
    fresh_files = sorted(p.name for p in fresh.iterdir() if "_pb2" in p.name)
    committed_files = sorted(p.name for p in GENERATED.iterdir() if "_pb2" in p.name)
    assert fresh_files == committed_files, "generated file set differs: run `make protos`"
    _, mismatch, errors = filecmp.cmpfiles(fresh, GENERATED, fresh_files, shallow=False)
    assert not mismatch and not errors, f"stale generated code {mismatch}: run `make protos`"


def test_every_proto_has_generated_code() -> None:
    for proto in GENERATED.glob("*.proto"):
        assert (GENERATED / f"{proto.stem}_pb2.py").exists(), proto.name


def test_generated_code_imports_without_runtime_version() -> None:
    """protobuf 4.25 (the board's, requirements-board.txt) has no runtime_version module:
    the committed code must still import. Blocking the module here stands in for it."""
    import subprocess

    modules = sorted(f"edgekms.v1.{p.stem}" for p in GENERATED.glob("*_pb2*.py"))
    code = "\n".join(
        [
            "import sys",
            # The runtime's own well-known types (workload.proto's Struct) come with
            # whichever protobuf is installed, 4.25's without the check: loaded first.
            "import google.protobuf.struct_pb2",
            "sys.modules['google.protobuf.runtime_version'] = None",
            *(f"import {m}" for m in modules),
            "print('ok')",
        ]
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_compat_rewrite_refuses_output_of_an_unknown_shape(tmp_path: Path) -> None:
    """A generator whose output changed must stop `make protos`, not commit half a rewrite."""
    gen = _load_generator()
    module = tmp_path / "edgekms" / "v1" / "odd_pb2_grpc.py"
    module.parent.mkdir(parents=True)
    original = "import grpc\n\nclass OddStub:\n    pass\n"
    module.write_text(original)
    try:
        gen.compat(module)
    except SystemExit as refused:
        assert "odd_pb2_grpc.py" in str(refused)
    else:
        raise AssertionError("compat accepted a module without the grpcio version check")
    assert module.read_text() == original
