"""Keep python-pkcs11's optional helpers (and asn1crypto under them) out of memory until used.

`import pkcs11` runs `from pkcs11.util import dh, dsa, ec, rsa, x509`, and those helper
modules import asn1crypto at their top: ~13 MB resident in a crypto service that never
calls them (its few DER conversions are in providers/der.py). Registering the helpers as
lazy modules before the first `import pkcs11` keeps the names importable; a module runs,
and asn1crypto loads, only when someone touches one of its attributes.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys

_HELPERS = ("dh", "dsa", "ec", "rsa", "x509")


def defer_pkcs11_util() -> None:
    """Import pkcs11 with its helpers lazy; idempotent, and a no-op once pkcs11 is loaded."""
    if "pkcs11" in sys.modules:
        return
    # find_spec on a top-level name locates the package without running its __init__.
    package = importlib.util.find_spec("pkcs11")
    if package is None or not package.submodule_search_locations:
        return  # not installed: the caller's own import reports it
    locations = list(package.submodule_search_locations)
    util_spec = importlib.machinery.PathFinder.find_spec("pkcs11.util", locations)
    if util_spec is None or util_spec.loader is None:
        return
    # pkcs11.util itself is one small function; it is loaded first, by hand, so that the
    # helpers can be its attributes: `from pkcs11.util import dh` then finds them there
    # and never goes through the import machinery, which would touch (and load) them.
    util = importlib.util.module_from_spec(util_spec)
    sys.modules["pkcs11.util"] = util
    util_spec.loader.exec_module(util)
    util_path = list(util_spec.submodule_search_locations or ())
    for helper in _HELPERS:
        name = f"pkcs11.util.{helper}"
        spec = importlib.machinery.PathFinder.find_spec(name, util_path)
        if spec is None or spec.loader is None:
            continue
        loader = importlib.util.LazyLoader(spec.loader)
        spec.loader = loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        loader.exec_module(module)
        setattr(util, helper, module)
    import pkcs11

    # An import that finds a submodule already loaded does not bind it on its parent.
    pkcs11.util = util  # type: ignore[attr-defined]
