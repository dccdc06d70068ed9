"""edgekms.aio.run: uvloop when importable, the standard loop otherwise."""

from __future__ import annotations

import asyncio
import sys

import pytest
import uvloop

from edgekms import aio


async def _loop_type() -> type:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop())


def test_runs_on_uvloop_when_installed() -> None:
    assert aio.loop_name() == "uvloop"
    assert issubclass(aio.run(_loop_type()), uvloop.Loop)


def test_falls_back_to_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert aio.loop_name() == "asyncio"
    loop_type = aio.run(_loop_type())
    assert not issubclass(loop_type, uvloop.Loop)
    assert issubclass(loop_type, asyncio.BaseEventLoop)


def test_returns_the_result_and_raises_the_error() -> None:
    async def boom() -> None:
        raise ValueError("inner")

    async def value() -> int:
        return 7

    assert aio.run(value()) == 7
    with pytest.raises(ValueError, match="inner"):
        aio.run(boom())
