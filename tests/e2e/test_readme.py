"""The README's Python example runs as written against a real stack."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.doccommands import block
from tests.e2e.conftest import KmsStack, start_stack, stop_stack

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_example_runs(kms_stack: KmsStack) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1, "the README has one Python example"
    default = "~/.local/share/edgekms/client/config.toml"
    assert default in blocks[0]
    code = blocks[0].replace(default, str(kms_stack.client_config))
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    csr = namespace["csr"]
    assert getattr(csr, "is_signature_valid", False) is True


def test_readme_shell_blocks_run_as_written(tmp_path: Path) -> None:
    """The five-minute tour and the security commands, line by line under `set -e`,
    against a stack of their own (the tour names keys other tests might use)."""
    stack = start_stack(tmp_path / "data")
    try:
        root = README.parent
        tour = block("README.md", "## A five-minute tour", 0).text.replace(
            ". .venv/bin/activate", f". {root}/.venv/bin/activate"
        )
        security = block("README.md", "## Who may do what", 0).text
        script = "set -euo pipefail\n" + tour + security
        result = subprocess.run(
            ["bash", "-c", script],
            cwd=tmp_path,
            env={**stack.env(), "PATH": f"{root}/.venv/bin:/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert "Verified OK" in result.stdout
        assert (tmp_path / "backup-job" / "backup-job.crt").exists()
    finally:
        assert stop_stack(stack) == 0
