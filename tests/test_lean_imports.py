"""What each service's entry point loads, checked in a fresh interpreter.

Resident memory is a target (docs/performance.md): the PKCS#11 crypto service stays out
of cryptography, asn1crypto, aiohttp and grpc, and no service imports another's
package. An RSS threshold would be flaky on a shared machine; the module list is exact,
and it is what fails when someone adds a top-level import that drags them back in.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def loaded_after(*statements: str) -> set[str]:
    """Names of the modules actually loaded (not blocked with None) after `statements`."""
    code = "\n".join(
        [
            "import json, sys",
            *statements,
            "print(json.dumps(sorted(n for n, m in sys.modules.items() if m is not None)))",
        ]
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return set(json.loads(done.stdout))


def packages(modules: set[str]) -> set[str]:
    return {name.partition(".")[0] for name in modules}


def test_pkcs11_crypto_service_stays_lean() -> None:
    loaded = packages(
        loaded_after(
            "import crypto_service.__main__",
            "import crypto_service.providers.pkcs11",
            "from crypto_service.config import make_provider",
        )
    )
    assert "crypto_service" in loaded and "pkcs11" in loaded and "nats" in loaded
    assert not loaded & {"cryptography", "asn1crypto", "aiohttp", "grpc", "mgmt", "broker"}


def test_tpm_crypto_service_imports_no_other_service() -> None:
    loaded = packages(
        loaded_after("import crypto_service.__main__", "import crypto_service.providers.tpm2")
    )
    assert "tpm2_pytss" in loaded
    assert not loaded & {"asn1crypto", "aiohttp", "grpc", "mgmt", "broker"}


def test_broker_imports_no_other_service() -> None:
    loaded = packages(loaded_after("import broker.__main__", "import broker.server"))
    assert "grpc" in loaded
    assert not loaded & {"aiohttp", "mgmt", "crypto_service", "asn1crypto"}


def test_shared_tables_do_not_load_cryptography() -> None:
    loaded = packages(loaded_after("import edgekms.algorithms", "import edgekms.busauth"))
    assert "cryptography" not in loaded


@pytest.mark.parametrize("helper", ["dh", "dsa", "ec", "rsa", "x509"])
def test_deferred_pkcs11_helpers_still_work(helper: str) -> None:
    """python-pkcs11's helpers load (with asn1crypto) on first use, not never."""
    before = loaded_after("import crypto_service.providers.pkcs11", "import pkcs11.util")
    assert "asn1crypto" not in packages(before)
    after = loaded_after(
        "import crypto_service.providers.pkcs11",
        "import pkcs11",
        f"assert callable(next(v for k, v in vars(pkcs11.util.{helper}).items()"
        " if k.startswith(('encode_', 'decode_'))))",
        f"from pkcs11.util.{helper} import *",
    )
    assert "asn1crypto" in packages(after)


def test_ca_serve_loads_neither_grpc_nor_aiohttp() -> None:
    """`kmsctl ca serve` execs `python -m ca_service`, a long-running service: none of
    kmsctl's client side, not even its CLI (click), nor uvloop or importlib.metadata
    (ca_service.__main__ says what each costs)."""
    modules = loaded_after(
        "from ca_service.__main__ import main",
        # A config that does not exist: main imports the service, then answers 2.
        "assert main(['--config', '/nonexistent/ca.toml', '--log-level', 'error']) == 2",
        "import ca_service.service, ca_service.http",
        "import edgekms.registry_record, edgekms.crypto_client",
    )
    loaded = packages(modules)
    assert {"ca_service", "nats", "cryptography", "google"} <= loaded
    assert "ca_service.service" in modules
    # A service of its own: nothing of kmsctl's package, nor another service's.
    assert not loaded & {"grpc", "aiohttp", "broker", "crypto_service", "mgmt", "click", "uvloop"}
    assert "importlib.metadata" not in modules and "mgmt.cli" not in modules


def test_up_watcher_loads_the_standard_library_only() -> None:
    """What stays of `kmsctl up` once the stack is up (mgmt.upwatch, issue 19: the
    supervisor <= 45 MB RSS): the standard library, edgekms.logs and mgmt.logrotate;
    no nats-py, cryptography, click, protobuf or grpc."""
    loaded = loaded_after("import mgmt.upwatch")
    ours = {m for m in loaded if m.partition(".")[0] in ("mgmt", "edgekms")}
    assert ours == {"mgmt", "mgmt.upwatch", "mgmt.logrotate", "edgekms", "edgekms.logs"}
    others = packages(loaded) - {"mgmt", "edgekms"} - set(sys.stdlib_module_names)
    # The interpreter's own (__main__) and the editable install's import hooks.
    assert {p for p in others if not p.startswith("_")} == set(), others
