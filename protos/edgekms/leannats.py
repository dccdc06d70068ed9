"""nats-py imported without the two things an EdgeKMS service process never uses, for
the services' resident memory (issue 19's 45 MB per service).

- aiohttp: nats-py imports it (its WebSocket transport) whenever it is installed, ~10 MB
  resident; every service dials tcp/tls.
- importlib.metadata: nats-py asks it for its own version, only to report it in CONNECT;
  it brings zipfile, email, csv, shutil, tempfile and importlib.resources, ~1.6 MB.
  Blocked for that one import, nats reports version 0.0.0, which the server only shows
  in its monitoring endpoints.

Call it first thing in a service's entry point, before anything imports nats."""

from __future__ import annotations

import sys


def import_nats_lean() -> None:
    sys.modules.setdefault("aiohttp", None)  # type: ignore[arg-type]
    if "nats" in sys.modules or "importlib.metadata" in sys.modules:
        return
    sys.modules["importlib.metadata"] = None  # type: ignore[assignment]
    try:
        import nats  # noqa: F401
    finally:
        del sys.modules["importlib.metadata"]
