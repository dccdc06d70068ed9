"""broker.paging: the token names the last entry returned; pages neither repeat nor skip
what existed throughout, whatever changed between them (pure logic)."""

from __future__ import annotations

import pytest

from broker.paging import decode_token, encode_token, page_by_name
from edgekms.errors import InvalidArgument


def _walk(names: list[str], size: int) -> list[str]:
    out: list[str] = []
    token = ""
    while True:
        page, token = page_by_name(sorted(names), lambda n: n, size, token)
        out.extend(page)
        if not token:
            return out


@pytest.mark.parametrize("size", [1, 2, 3, 7, 100])
def test_walks_every_name_once(size: int) -> None:
    names = [f"n{i:03d}" for i in range(23)]
    assert _walk(names, size) == names


def test_an_exact_multiple_ends_without_an_empty_page() -> None:
    page, token = page_by_name(["a", "b"], lambda n: n, 2, "")
    assert (page, token) == (["a", "b"], "")


def test_changes_between_pages_neither_repeat_nor_skip() -> None:
    names = ["a", "c", "e", "g"]
    first, token = page_by_name(names, lambda n: n, 2, "")
    assert first == ["a", "c"]
    # "b" added before the token and "c" removed: the next page starts after "c".
    rest, token = page_by_name(sorted(["a", "b", "d", "e", "g"]), lambda n: n, 2, token)
    assert rest == ["d", "e"] and token
    last, token = page_by_name(["a", "b", "d", "e", "g"], lambda n: n, 2, token)
    assert (last, token) == (["g"], "")


def test_default_size_is_100() -> None:
    page, token = page_by_name([f"{i:04d}" for i in range(150)], lambda n: n, 0, "")
    assert len(page) == 100 and decode_token(token) == "0099"


@pytest.mark.parametrize("token", ["%%%", "", "x" * 600])
def test_foreign_tokens_are_refused(token: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        decode_token(token)
    assert refused.value.reason == "list.page_token_invalid"


def test_oversized_pages_are_refused() -> None:
    with pytest.raises(InvalidArgument) as refused:
        page_by_name([], lambda n: n, 1001, "")
    assert refused.value.reason == "list.page_size_invalid"
    assert decode_token(encode_token("keys/é")) == "keys/é"
