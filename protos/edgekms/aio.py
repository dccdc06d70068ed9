"""The event loop of the broker and the crypto services: uvloop where it is installed.

uvloop measured +9 % end-to-end Sign throughput with the broker and the crypto services
on it (issue 7), for ~2 MB of resident memory each. The CA service does not use it: its
issuance waits on token signatures, not on the loop, and it is held to 45 MB
(ca_service/__main__.py). It is a dependency of the package
and of the device image, but a service still starts on the standard loop where it is
missing (a platform without a wheel), since nothing depends on uvloop's behaviour.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_name() -> str:
    """Which event loop `run` uses: "uvloop" or "asyncio" (for logs and tests)."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(coro), on a uvloop event loop when uvloop is importable."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)
