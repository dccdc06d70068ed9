"""The README's Python example runs as written against a real stack."""

from __future__ import annotations

import re
from pathlib import Path

from tests.e2e.conftest import KmsStack

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
