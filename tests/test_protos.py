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
